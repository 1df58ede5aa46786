//! The fast CPU convolution and max pooling (custom ops) against candle's reference ops:
//! forward values and the gradients backprop gives for x, weight and bias, over kernel sizes,
//! strides, paddings, channel counts and batch sizes the two models use (and a few more).
//! (Over 500 lines: every op's cases go through the same direct-loop references and
//! comparison helpers at the top, which one file keeps in one place.)

use candle_core::{DType, Device, Result, Tensor, Var};
use fmnist_nn::ops;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, dims: &[usize]) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(data, dims, &Device::Cpu)
}

/// Largest |a-b| relative to the largest |b| (1e-4 is f32 accumulation noise for these sizes).
fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) -> Result<()> {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shapes differ");
    let a = ours.flatten_all()?.to_vec1::<f32>()?;
    let b = reference.flatten_all()?.to_vec1::<f32>()?;
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    // NaN-propagating: a kernel that returns NaN fails.
    let worst = fmnist_nn::check::max_abs_diff(&a, &b);
    assert!(
        worst <= 1e-4 * scale,
        "{what}: max abs diff {worst} vs scale {scale}"
    );
    Ok(())
}

/// The convolution and its gradients for `grad_y`, straight from the definition (slow,
/// obviously right): returns (y, grad_x, grad_w, grad_bias).
fn direct_conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    grad_y: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (b, cin, h, wd) = x.dims4()?;
    let (cout, _, k, _) = w.dims4()?;
    let (ho, wo) = (
        (h + 2 * padding - k) / stride + 1,
        (wd + 2 * padding - k) / stride + 1,
    );
    let xv = x.flatten_all()?.to_vec1::<f32>()?;
    let wv = w.flatten_all()?.to_vec1::<f32>()?;
    let gyv = match grad_y {
        Some(t) => t.flatten_all()?.to_vec1::<f32>()?,
        None => vec![0.0; b * cout * ho * wo],
    };
    let bv = match bias {
        Some(t) => t.to_vec1::<f32>()?,
        None => vec![0.0; cout],
    };
    let mut y = vec![0f32; b * cout * ho * wo];
    let (mut gx, mut gw, mut gb) = (vec![0f32; xv.len()], vec![0f32; wv.len()], vec![0f32; cout]);
    for n in 0..b {
        for co in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let yi = ((n * cout + co) * ho + oy) * wo + ox;
                    let mut acc = bv[co];
                    gb[co] += gyv[yi];
                    for ci in 0..cin {
                        for ki in 0..k {
                            for kj in 0..k {
                                let iy = (oy * stride + ki) as isize - padding as isize;
                                let ix = (ox * stride + kj) as isize - padding as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi = ((n * cin + ci) * h + iy as usize) * wd + ix as usize;
                                let wi = ((co * cin + ci) * k + ki) * k + kj;
                                acc += xv[xi] * wv[wi];
                                gx[xi] += wv[wi] * gyv[yi];
                                gw[wi] += xv[xi] * gyv[yi];
                            }
                        }
                    }
                    y[yi] = acc;
                }
            }
        }
    }
    let dev = x.device();
    Ok((
        Tensor::from_vec(y, (b, cout, ho, wo), dev)?,
        Tensor::from_vec(gx, x.dims(), dev)?,
        Tensor::from_vec(gw, w.dims(), dev)?,
        Tensor::from_vec(gb, cout, dev)?,
    ))
}

struct Case {
    batch: usize,
    cin: usize,
    cout: usize,
    size: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    bias: bool,
}

fn check_conv(case: &Case, seed: u64, against_candle: bool) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let what = format!(
        "conv b{} {}->{} {}x{} k{} s{} p{} bias={}",
        case.batch,
        case.cin,
        case.cout,
        case.size,
        case.size,
        case.kernel,
        case.stride,
        case.padding,
        case.bias
    );
    let x = Var::from_tensor(&random(
        &mut rng,
        &[case.batch, case.cin, case.size, case.size],
    )?)?;
    let w = Var::from_tensor(&random(
        &mut rng,
        &[case.cout, case.cin, case.kernel, case.kernel],
    )?)?;
    let b = Var::from_tensor(&random(&mut rng, &[case.cout])?)?;
    let bias = case.bias.then_some(b.as_tensor());
    let ours = ops::conv2d(&x, &w, bias, case.stride, case.padding)?;
    let probe = random(&mut rng, ours.dims())?;
    let (y_direct, gx_direct, gw_direct, gb_direct) =
        direct_conv(&x, &w, bias, Some(&probe), case.stride, case.padding)?;
    assert_close(&format!("{what} forward"), &ours, &y_direct)?;
    let grads = (&ours * &probe)?.sum_all()?.backward()?;
    let mut expected = vec![("x", &x, gx_direct), ("weight", &w, gw_direct)];
    if case.bias {
        expected.push(("bias", &b, gb_direct));
    }
    for (name, var, reference) in &expected {
        let Some(ours) = grads.get(var) else {
            panic!("{what}: no gradient for {name}");
        };
        assert_close(&format!("{what} grad {name}"), ours, reference)?;
    }
    if against_candle {
        // candle's own ops and backprop must agree too (they do on these shapes; candle's
        // reference conv2d is itself wrong on some tiny shapes, hence the direct loops above).
        let reference = ops::reference_conv2d(&x, &w, bias, case.stride, case.padding)?;
        assert_close(&format!("{what} candle forward"), &ours, &reference)?;
        let grads_ref = (&reference * &probe)?.sum_all()?.backward()?;
        for (name, var, _) in &expected {
            let (Some(g_ours), Some(g_ref)) = (grads.get(var), grads_ref.get(var)) else {
                panic!("{what}: no gradient for {name}");
            };
            assert_close(&format!("{what} candle grad {name}"), g_ours, g_ref)?;
        }
    }
    Ok(())
}

#[test]
fn conv_matches_candle_on_model_shapes() -> Result<()> {
    let cases = [
        // Baseline CNN.
        Case {
            batch: 4,
            cin: 1,
            cout: 32,
            size: 28,
            kernel: 3,
            stride: 1,
            padding: 0,
            bias: true,
        },
        Case {
            batch: 3,
            cin: 32,
            cout: 64,
            size: 26,
            kernel: 3,
            stride: 1,
            padding: 0,
            bias: true,
        },
        // ResNet-18 stem, blocks, downsampling convs.
        Case {
            batch: 2,
            cin: 1,
            cout: 16,
            size: 28,
            kernel: 7,
            stride: 2,
            padding: 3,
            bias: false,
        },
        Case {
            batch: 5,
            cin: 16,
            cout: 16,
            size: 7,
            kernel: 3,
            stride: 1,
            padding: 1,
            bias: false,
        },
        Case {
            batch: 3,
            cin: 16,
            cout: 32,
            size: 7,
            kernel: 3,
            stride: 2,
            padding: 1,
            bias: false,
        },
        Case {
            batch: 3,
            cin: 16,
            cout: 32,
            size: 7,
            kernel: 1,
            stride: 2,
            padding: 0,
            bias: false,
        },
        Case {
            batch: 70,
            cin: 8,
            cout: 12,
            size: 1,
            kernel: 3,
            stride: 1,
            padding: 1,
            bias: false,
        },
        Case {
            batch: 20,
            cin: 8,
            cout: 8,
            size: 2,
            kernel: 3,
            stride: 2,
            padding: 1,
            bias: true,
        },
        // layer3's 2x2 maps: the dense form.
        Case {
            batch: 6,
            cin: 16,
            cout: 24,
            size: 2,
            kernel: 3,
            stride: 1,
            padding: 1,
            bias: true,
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        check_conv(case, 100 + i as u64, true)?;
    }
    Ok(())
}

#[test]
fn conv_matches_candle_on_random_shapes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for i in 0..40 {
        let kernel: usize = [1, 3, 7][rng.gen_range(0..3)];
        let padding = [0, 1, 3][rng.gen_range(0..3)].min(kernel);
        let stride = rng.gen_range(1..=2);
        let size = rng.gen_range(kernel.saturating_sub(2 * padding).max(1)..12);
        let case = Case {
            batch: [1, 2, 5, 40][rng.gen_range(0..4)],
            cin: [1, 2, 3, 8][rng.gen_range(0..4)],
            cout: rng.gen_range(1..9),
            size,
            kernel,
            stride,
            padding,
            bias: rng.gen_bool(0.5),
        };
        check_conv(&case, 1000 + i, false)?;
    }
    Ok(())
}

#[test]
fn conv_is_bit_reproducible() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = Var::from_tensor(&random(&mut rng, &[64, 8, 12, 12])?)?;
    let w = Var::from_tensor(&random(&mut rng, &[16, 8, 3, 3])?)?;
    let run = || -> Result<(Vec<f32>, Vec<f32>)> {
        let y = ops::conv2d(&x, &w, None, 1, 1)?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        let gw = grads
            .get(&w)
            .expect("weight gradient")
            .flatten_all()?
            .to_vec1()?;
        let gx = grads
            .get(&x)
            .expect("input gradient")
            .flatten_all()?
            .to_vec1()?;
        Ok((gw, gx))
    };
    let first = run()?;
    for _ in 0..3 {
        assert!(run()? == first, "gradients changed between identical runs");
    }
    Ok(())
}

#[test]
fn conv_rejects_mismatched_weight() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = random(&mut rng, &[1, 3, 8, 8])?;
    let w = random(&mut rng, &[4, 2, 3, 3])?;
    assert!(ops::conv2d(&x, &w, None, 1, 0).is_err());
    Ok(())
}

/// Max-pool gradient for `grad_y` from the definition: each window's gradient goes to its
/// (first) maximum, padding never wins.
fn direct_pool_grad(x: &Tensor, grad_y: &Tensor, k: usize, s: usize, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (_, _, ho, wo) = grad_y.dims4()?;
    let xv = x.flatten_all()?.to_vec1::<f32>()?;
    let gyv = grad_y.flatten_all()?.to_vec1::<f32>()?;
    let mut gx = vec![0f32; xv.len()];
    for plane in 0..b * c {
        for oy in 0..ho {
            for ox in 0..wo {
                let mut best: Option<(f32, usize)> = None;
                for ki in 0..k {
                    for kj in 0..k {
                        let iy = (oy * s + ki) as isize - p as isize;
                        let ix = (ox * s + kj) as isize - p as isize;
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        let i = (plane * h + iy as usize) * w + ix as usize;
                        if best.is_none_or(|(v, _)| xv[i] > v) {
                            best = Some((xv[i], i));
                        }
                    }
                }
                if let Some((_, i)) = best {
                    gx[i] += gyv[(plane * ho + oy) * wo + ox];
                }
            }
        }
    }
    Tensor::from_vec(gx, x.dims(), x.device())
}

fn check_pool(
    dims: [usize; 4],
    kernel: usize,
    stride: usize,
    padding: usize,
    seed: u64,
) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let what = format!("pool {dims:?} k{kernel} s{stride} p{padding}");
    let x = Var::from_tensor(&random(&mut rng, &dims)?)?;
    let ours = ops::max_pool2d(&x, kernel, stride, padding)?;
    let reference = ops::portable_max_pool2d(&x, kernel, stride, padding)?;
    assert_close(&format!("{what} forward"), &ours, &reference)?;
    // Untracked input: the values-only path (no argmax bookkeeping).
    let untracked = ops::max_pool2d(&x.as_tensor().detach(), kernel, stride, padding)?;
    assert_close(&format!("{what} untracked"), &untracked, &reference)?;
    let probe = random(&mut rng, ours.dims())?;
    let grads = (&ours * &probe)?.sum_all()?.backward()?;
    let Some(grad) = grads.get(&x) else {
        panic!("{what}: no gradient");
    };
    // Not candle's backprop: candle 0.9 scales the max-pool gradient by 1/k^2 (it multiplies
    // by the window's mask average instead of dividing by the tie count).
    let expected = direct_pool_grad(&x, &probe, kernel, stride, padding)?;
    assert_close(&format!("{what} grad"), grad, &expected)
}

#[test]
fn max_pool_matches_candle() -> Result<()> {
    // Baseline's 2x2/2, ResNet's 3x3/2 pad 1, odd sizes, overlapping windows.
    check_pool([3, 4, 24, 24], 2, 2, 0, 1)?;
    check_pool([2, 5, 14, 14], 3, 2, 1, 2)?;
    check_pool([1, 1, 7, 9], 3, 2, 1, 3)?;
    check_pool([2, 3, 5, 5], 3, 1, 1, 4)?;
    check_pool([2, 3, 9, 8], 2, 2, 0, 5)?;
    check_pool([1, 2, 6, 6], 3, 3, 0, 6)?;
    Ok(())
}

#[test]
fn max_pool_without_grad_tracking_works() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let x = random(&mut rng, &[2, 2, 6, 6])?;
    let ours = ops::max_pool2d(&x, 2, 2, 0)?;
    let reference = ops::portable_max_pool2d(&x, 2, 2, 0)?;
    assert_close("pool untracked", &ours, &reference)
}

#[test]
fn conv_weight_grad_without_input_grad() -> Result<()> {
    // The first layer's input (the images) tracks no gradient: only weight and bias are computed.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let x = random(&mut rng, &[9, 1, 28, 28])?;
    let w = Var::from_tensor(&random(&mut rng, &[32, 1, 3, 3])?)?;
    let b = Var::from_tensor(&random(&mut rng, &[32])?)?;
    let y = ops::conv2d(&x, &w, Some(&b), 1, 0)?;
    let probe = random(&mut rng, y.dims())?;
    let grads = (&y * &probe)?.sum_all()?.backward()?;
    let (_, _, gw, gb) = direct_conv(&x, &w, Some(&b), Some(&probe), 1, 0)?;
    assert!(grads.get(&x).is_none());
    assert_close(
        "untracked input grad weight",
        grads.get(&w).expect("weight grad"),
        &gw,
    )?;
    assert_close(
        "untracked input grad bias",
        grads.get(&b).expect("bias grad"),
        &gb,
    )
}

/// The gradients backprop gives each of `vars` through `ours` and through `reference`, both
/// weighted by `upstream`, agree.
fn assert_grads_close(
    ours: &Tensor,
    reference: &Tensor,
    upstream: &Tensor,
    vars: [(&str, &Var); 3],
) -> Result<()> {
    let g_ours = (ours * upstream)?.sum_all()?.backward()?;
    let g_reference = (reference * upstream)?.sum_all()?.backward()?;
    for (what, v) in vars {
        let (Some(a), Some(r)) = (g_ours.get(v), g_reference.get(v)) else {
            panic!("no gradient for {what}");
        };
        assert_close(what, a, r)?;
    }
    Ok(())
}

#[test]
fn fused_conv_relu_pool_matches_the_separate_ops() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // (batch, cin, size, cout, kernel, padding, pool kernel/stride/padding): the baseline's
    // conv2 and 2x2 pool, ResNet's eval stem with its 3x3/2 padded pool, odd sizes (the pool
    // drops the last row and column), chunks of several images, and 1x1 kernels.
    let cases = [
        (64, 32, 26, 64, 3, 0, 2, 2, 0),
        (5, 1, 28, 8, 7, 3, 3, 2, 1),
        (3, 2, 9, 5, 3, 1, 2, 2, 0),
        (40, 3, 5, 4, 3, 0, 2, 2, 0),
        (2, 4, 8, 3, 1, 0, 3, 2, 1),
    ];
    for (batch, cin, size, cout, kernel, padding, pool_kernel, pool_stride, pool_padding) in cases {
        let x = Var::from_tensor(&random(&mut rng, &[batch, cin, size, size])?)?;
        let w = Var::from_tensor(&random(&mut rng, &[cout, cin, kernel, kernel])?)?;
        let b = Var::from_tensor(&random(&mut rng, &[cout])?)?;
        let pool = ops::MaxPool {
            kernel: pool_kernel,
            stride: pool_stride,
            padding: pool_padding,
        };
        let fused = ops::conv2d_relu_pool(&x, &w, Some(&b), 1, padding, pool)?;
        let conv = ops::conv2d_relu(&x, &w, Some(&b), 1, padding)?;
        let separate = ops::max_pool2d(&conv, pool_kernel, pool_stride, pool_padding)?;
        assert_close("pooled output", &fused, &separate)?;
        let (xd, wd, bd) = (
            x.as_tensor().detach(),
            w.as_tensor().detach(),
            b.as_tensor().detach(),
        );
        let inference = ops::conv2d_relu_pool(&xd, &wd, Some(&bd), 1, padding, pool)?;
        assert_close("pooled output without indices", &inference, &separate)?;
        let upstream = random(&mut rng, fused.dims())?;
        assert_grads_close(
            &fused,
            &separate,
            &upstream,
            [("x", &x), ("weight", &w), ("bias", &b)],
        )?;
    }
    Ok(())
}

#[test]
fn fused_dropout_and_flatten_match_the_separate_ops() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    // The baseline's conv2 + pool + dropout(0.25) + flatten, and a small odd case.
    for (batch, cin, size, cout) in [(8, 32, 26, 64), (3, 2, 9, 5)] {
        let x = Var::from_tensor(&random(&mut rng, &[batch, cin, size, size])?)?;
        let w = Var::from_tensor(&random(&mut rng, &[cout, cin, 3, 3])?)?;
        let b = Var::from_tensor(&random(&mut rng, &[cout])?)?;
        let pool = ops::MaxPool {
            kernel: 2,
            stride: 2,
            padding: 0,
        };
        let pooled = ops::conv2d_relu_pool(&x, &w, Some(&b), 1, 0, pool)?;
        let mask: Vec<f32> = (0..pooled.elem_count())
            .map(|_| if rng.gen_bool(0.25) { 0.0 } else { 1.0 / 0.75 })
            .collect();
        let mask_tensor = Tensor::from_vec(mask.clone(), pooled.shape(), &Device::Cpu)?;
        let separate = (&pooled * &mask_tensor)?.flatten_from(1)?;
        let fused = ops::conv2d_relu_pool_flat(&x, &w, Some(&b), 1, 0, pool, Some(mask))?;
        assert_eq!(fused.dims(), separate.dims());
        assert_close("masked flat output", &fused, &separate)?;
        let upstream = random(&mut rng, fused.dims())?;
        assert_grads_close(
            &fused,
            &separate,
            &upstream,
            [("x", &x), ("weight", &w), ("bias", &b)],
        )?;
        // Off the fast path (f64 here, as on a GPU) the same op is candle's ops in sequence.
        let as_f64 = |t: &Tensor| t.to_dtype(DType::F64);
        let mask: Vec<f32> = mask_tensor.flatten_all()?.to_vec1()?;
        let reference = ops::conv2d_relu_pool_flat(
            &as_f64(&x)?,
            &as_f64(&w)?,
            Some(&as_f64(&b)?),
            1,
            0,
            pool,
            Some(mask),
        )?;
        assert_eq!(reference.dtype(), DType::F64);
        assert_close("reference path", &fused, &reference.to_dtype(DType::F32)?)?;
        // A mask of the wrong length is an error, not a panic.
        let short = ops::conv2d_relu_pool_flat(&x, &w, Some(&b), 1, 0, pool, Some(vec![1.0; 3]));
        assert!(short.is_err());
    }
    Ok(())
}

#[test]
fn max_pool_propagates_nan_with_and_without_indices() -> Result<()> {
    let mut values = vec![1f32; 36];
    values[0] = f32::NAN; // only the top-left windows see it
    let x = Var::from_tensor(&Tensor::from_vec(values, (1, 1, 6, 6), &Device::Cpu)?)?;
    for pooled in [
        ops::max_pool2d(&x, 2, 2, 0)?,
        ops::max_pool2d(&x.as_tensor().detach(), 2, 2, 0)?,
        ops::max_pool2d(&x.as_tensor().detach(), 3, 2, 1)?,
    ] {
        let v = pooled.flatten_all()?.to_vec1::<f32>()?;
        assert!(v[0].is_nan(), "{v:?}");
        assert!(v[1..].iter().any(|x| !x.is_nan()), "{v:?}");
    }
    Ok(())
}

/// The portable max pooling (what GPUs run) against the definition: forward values and the
/// gradient of each window routed to its first maximum, overlapping windows adding up, on the
/// ResNet stem's 3x3/2 pad 1 (kernel != stride, which candle's own backward refuses) and other
/// geometries; inputs on a coarse grid so that ties are common.
#[test]
fn portable_max_pool_forward_and_backward_match_direct_loops() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let cases = [
        ([2, 3, 14, 14], 3, 2, 1),
        ([1, 2, 7, 9], 3, 2, 1),
        ([3, 4, 24, 24], 2, 2, 0),
        ([2, 3, 5, 5], 3, 1, 1),
        ([1, 2, 6, 6], 3, 3, 0),
        ([2, 1, 9, 8], 4, 3, 2),
    ];
    for (dims, kernel, stride, padding) in cases {
        let what = format!("portable pool {dims:?} k{kernel} s{stride} p{padding}");
        let n: usize = dims.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (rng.gen_range(-4i32..4) as f32) * 0.25)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(values, &dims[..], &Device::Cpu)?)?;
        let pooled = ops::portable_max_pool2d(&x, kernel, stride, padding)?;
        let fast = ops::with_kernels(ops::Kernels::Fast, || {
            ops::max_pool2d(&x, kernel, stride, padding)
        })?;
        assert_eq!(
            pooled.flatten_all()?.to_vec1::<f32>()?,
            fast.flatten_all()?.to_vec1::<f32>()?,
            "{what}: forward"
        );
        let probe = random(&mut rng, pooled.dims())?;
        let grads = (&pooled * &probe)?.sum_all()?.backward()?;
        let Some(grad) = grads.get(&x) else {
            panic!("{what}: no gradient");
        };
        let expected = direct_pool_grad(&x, &probe, kernel, stride, padding)?;
        assert_close(&format!("{what} grad"), grad, &expected)?;
    }
    Ok(())
}

#[test]
fn portable_max_pool_propagates_nan_and_runs_in_f64() -> Result<()> {
    let mut values = vec![1f32; 36];
    values[0] = f32::NAN;
    let x = Tensor::from_vec(values, (1, 1, 6, 6), &Device::Cpu)?;
    let v = ops::portable_max_pool2d(&x, 3, 2, 1)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert!(v[0].is_nan(), "{v:?}");
    assert!(v[1..].iter().all(|x| *x == 1.0), "{v:?}");
    // All-negative input: the -inf padding never wins.
    let x = Var::from_tensor(&Tensor::new(&[[[[-1f64, -2.], [-3., -4.]]]], &Device::Cpu)?)?;
    let y = ops::portable_max_pool2d(&x, 3, 2, 1)?;
    assert_eq!(y.flatten_all()?.to_vec1::<f64>()?, vec![-1.0]);
    let grads = y.sum_all()?.backward()?;
    let Some(grad) = grads.get(&x) else {
        panic!("no gradient");
    };
    assert_eq!(
        grad.flatten_all()?.to_vec1::<f64>()?,
        vec![1.0, 0.0, 0.0, 0.0]
    );
    Ok(())
}

/// Under `kernels = "portable"` every model op (conv, fused conv+ReLU+pool with dropout and
/// flatten, linear, batch norm, residual add) takes candle's ops: no fast kernel runs, and the
/// values and gradients match the fast kernels'.
#[test]
fn portable_switch_covers_every_fused_op() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let x = Var::from_tensor(&random(&mut rng, &[4, 3, 12, 12])?)?;
    let w = Var::from_tensor(&random(&mut rng, &[5, 3, 3, 3])?)?;
    let b = Var::from_tensor(&random(&mut rng, &[5])?)?;
    let gamma = Var::from_tensor(&random(&mut rng, &[5])?)?;
    let beta = Var::from_tensor(&random(&mut rng, &[5])?)?;
    let w2 = Var::from_tensor(&random(&mut rng, &[5, 5, 3, 3])?)?;
    // 12x12 maps pooled 3x3/2 pad 1: 6x6.
    let fc_w = Var::from_tensor(&random(&mut rng, &[7, 5 * 36])?)?;
    let fc_b = Var::from_tensor(&random(&mut rng, &[7])?)?;
    let mask: Vec<f32> = (0..4 * 5 * 36)
        .map(|_| if rng.gen_bool(0.25) { 0.0 } else { 1.0 / 0.75 })
        .collect();
    let pool = ops::MaxPool {
        kernel: 3,
        stride: 2,
        padding: 1,
    };
    let forward = || -> Result<Tensor> {
        let h = ops::conv2d(&x, &w, Some(&b), 1, 1)?;
        let (h, _, _) = ops::batch_norm_train(&h, &gamma, &beta, 1e-5, true)?;
        let h = ops::add_relu(&h, &ops::conv2d_relu(&x, &w, None, 1, 1)?)?;
        let h = ops::conv2d_relu_pool_flat(&h, &w2, Some(&b), 1, 1, pool, Some(mask.clone()))?;
        ops::linear(&h, &fc_w, &fc_b, true)
    };
    let fast = ops::with_kernels(ops::Kernels::Fast, forward)?;
    let before = ops::fast_dispatches();
    let portable = ops::with_kernels(ops::Kernels::Portable, forward)?;
    assert_eq!(
        ops::fast_dispatches(),
        before,
        "a fast kernel ran on the portable path"
    );
    assert_close("portable forward", &portable, &fast)?;
    let upstream = random(&mut rng, fast.dims())?;
    let g_fast = ops::with_kernels(ops::Kernels::Fast, || {
        (&fast * &upstream)?.sum_all()?.backward()
    })?;
    let g_portable = ops::with_kernels(ops::Kernels::Portable, || {
        (&portable * &upstream)?.sum_all()?.backward()
    })?;
    for (what, v) in [
        ("x", &x),
        ("w", &w),
        ("w2", &w2),
        ("b", &b),
        ("gamma", &gamma),
        ("beta", &beta),
        ("fc_w", &fc_w),
        ("fc_b", &fc_b),
    ] {
        let (Some(p), Some(f)) = (g_portable.get(v), g_fast.get(v)) else {
            panic!("no gradient for {what}");
        };
        assert_close(&format!("portable grad {what}"), p, f)?;
    }
    Ok(())
}

/// Training-mode batch norm on every map size ResNet gives it, down to the 2x2 and 1x1 maps
/// whose sums walk the batch image by image: values, statistics and gradients against
/// candle's ops.
#[test]
fn batch_norm_train_matches_candle_on_small_and_large_maps() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    for (i, dims) in [
        [64, 6, 1, 1],
        [9, 5, 2, 2],
        [7, 3, 4, 4],
        [5, 4, 7, 7],
        [3, 2, 12, 12],
    ]
    .iter()
    .enumerate()
    {
        for relu in [false, true] {
            let x = Var::from_tensor(&random(&mut rng, dims)?.affine(3.0, 0.5)?)?;
            let gamma = Var::from_tensor(&random(&mut rng, &[dims[1]])?)?;
            let beta = Var::from_tensor(&random(&mut rng, &[dims[1]])?)?;
            let (y, mean, var) = ops::batch_norm_train(&x, &gamma, &beta, 1e-5, relu)?;
            let (y_ref, mean_ref, var_ref) =
                ops::reference_batch_norm_train(&x, &gamma, &beta, 1e-5, relu)?;
            let case = format!("case {i} relu {relu}");
            assert_close(&format!("{case}: y"), &y, &y_ref)?;
            assert_close(&format!("{case}: mean"), &mean, &mean_ref.flatten_all()?)?;
            assert_close(&format!("{case}: var"), &var, &var_ref.flatten_all()?)?;
            let upstream = random(&mut rng, dims)?;
            let grads = (&y * &upstream)?.sum_all()?.backward()?;
            let grads_ref = (&y_ref * &upstream)?.sum_all()?.backward()?;
            for (what, v) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
                let (Some(ours), Some(reference)) = (grads.get(v), grads_ref.get(v)) else {
                    panic!("{case}: no gradient for {what}");
                };
                assert_close(&format!("{case}: grad {what}"), ours, reference)?;
            }
        }
    }
    Ok(())
}
