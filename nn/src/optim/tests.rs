//! The optimizers against PyTorch's numbers, on both paths, and their state round trip.

use super::*;
use candle_core::{DType, Device};
use std::collections::HashMap;

/// Three steps on one parameter with fixed gradients, as in PyTorch's reference script
/// (torch 2.x, float64): returns the parameter afterwards.
fn run(config: OptimizerConfig) -> Result<Vec<f32>> {
    let p = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0, 0.0], &Device::Cpu)?)?;
    let mut opt = config.build(vec![("p".into(), p.clone())])?;
    let grads = [
        [0.1f32, -0.2, 0.3, 0.0],
        [-0.4, 0.5, 0.05, 1.0],
        [0.2, 0.2, -0.3, -1.0],
    ];
    for g in grads {
        // d/dp sum(p * g) = g: a real backward pass produces the gradient.
        let g = Tensor::new(&g, &Device::Cpu)?;
        let loss = (p.as_tensor() * &g)?.sum_all()?;
        opt.step(&loss.backward()?)?;
    }
    p.as_tensor().to_dtype(DType::F32)?.to_vec1()
}

fn assert_close(got: &[f32], want: &[f64]) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (*g as f64 - w).abs() <= 2e-6 + 1e-5 * w.abs(),
            "got {got:?}, PyTorch {want:?}"
        );
    }
}

#[test]
fn adadelta_matches_pytorch() -> Result<()> {
    let defaults: OptimizerConfig = toml::from_str("name = \"adadelta\"")
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    assert_close(
        &run(defaults)?,
        &[0.498379797, -1.003233947, 1.999332062, 8.215e-05],
    );
    let custom = OptimizerConfig::Adadelta {
        lr: 0.5,
        rho: 0.8,
        eps: 1e-4,
        weight_decay: 0.1,
    };
    assert_close(
        &run(custom)?,
        &[0.491125079, -1.006439331, 1.984808522, 0.000610308],
    );
    Ok(())
}

#[test]
fn adam_matches_pytorch() -> Result<()> {
    let defaults: OptimizerConfig =
        toml::from_str("name = \"adam\"").map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    assert_close(
        &run(defaults)?,
        &[0.499669677, -0.999985158, 1.998234626, -0.000698955],
    );
    let custom = OptimizerConfig::Adam {
        lr: 0.1,
        betas: (0.8, 0.9),
        eps: 1e-6,
        weight_decay: 0.01,
    };
    assert_close(
        &run(custom)?,
        &[0.465444708, -1.003021875, 1.823660854, -0.066755214],
    );
    Ok(())
}

#[test]
fn sgd_matches_pytorch() -> Result<()> {
    let plain = OptimizerConfig::Sgd {
        lr: 0.1,
        momentum: 0.0,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
    };
    assert_close(&run(plain)?, &[0.51, -1.05, 1.995, 0.0]);
    let momentum = OptimizerConfig::Sgd {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.1,
        weight_decay: 0.01,
        nesterov: false,
    };
    assert_close(
        &run(momentum)?,
        &[0.520643906, -1.044012113, 1.926625084, -0.080919],
    );
    let nesterov = OptimizerConfig::Sgd {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: true,
    };
    assert_close(&run(nesterov)?, &[0.53601, -1.10472, 1.94028, -0.081]);
    Ok(())
}

/// The portable path (the tensor ops a GPU runs) gives PyTorch's numbers too.
#[test]
fn portable_optimizer_steps_match_pytorch() -> Result<()> {
    let fast_before = crate::ops::fast_dispatches();
    crate::ops::with_kernels(crate::ops::Kernels::Portable, || {
        adadelta_matches_pytorch()?;
        adam_matches_pytorch()?;
        sgd_matches_pytorch()
    })?;
    assert_eq!(
        crate::ops::fast_dispatches(),
        fast_before,
        "a fused update ran"
    );
    Ok(())
}

#[test]
fn state_round_trip_continues_identically() -> Result<()> {
    let config = OptimizerConfig::Adam {
        lr: 0.1,
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let step = |opt: &mut Box<dyn Optimizer>, p: &Var, g: f32| -> Result<()> {
        let loss = (p.as_tensor() * g as f64)?.sum_all()?;
        opt.step(&loss.backward()?)
    };
    let fresh = || Var::from_tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap());
    // Uninterrupted: three steps.
    let p1 = fresh()?;
    let mut o1 = config.build(vec![("p".into(), p1.clone())])?;
    for g in [0.5, -0.25, 1.0] {
        step(&mut o1, &p1, g)?;
    }
    // Interrupted after two steps; a new optimizer resumes from the saved state.
    let p2 = fresh()?;
    let mut o2 = config.build(vec![("p".into(), p2.clone())])?;
    step(&mut o2, &p2, 0.5)?;
    step(&mut o2, &p2, -0.25)?;
    let saved: HashMap<String, Tensor> = o2.state()?.into_iter().collect();
    let mut o3 = config.build(vec![("p".into(), p2.clone())])?;
    o3.load_state(&saved)?;
    step(&mut o3, &p2, 1.0)?;
    assert_eq!(
        p1.as_tensor().to_vec1::<f32>()?,
        p2.as_tensor().to_vec1::<f32>()?
    );
    Ok(())
}

/// Four steps on a two-chunk vector and a small matrix, on the fused CPU path or the
/// portable tensor-op path: the parameters and the state afterwards.
fn train_on_path(config: &OptimizerConfig, portable: bool) -> Result<Vec<(String, Vec<f32>)>> {
    let kernels = if portable {
        crate::ops::Kernels::Portable
    } else {
        crate::ops::Kernels::Fast
    };
    crate::ops::with_kernels(kernels, || train_steps(config))
}

fn train_steps(config: &OptimizerConfig) -> Result<Vec<(String, Vec<f32>)>> {
    let wave = |n: usize, phase: f32| -> Result<Tensor> {
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + phase).sin()).collect();
        Tensor::from_vec(v, n, &Device::Cpu)
    };
    let long = Var::from_tensor(&wave(70_000, 0.1)?)?;
    let matrix = Var::from_tensor(&wave(12, 2.0)?.reshape((3, 4))?)?;
    let named = vec![("long".to_string(), long), ("matrix".to_string(), matrix)];
    let mut opt = config.build(named.clone())?;
    for step in 0..4 {
        let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu)?;
        for (_, var) in &named {
            let p = var.as_tensor();
            let target = wave(p.elem_count(), step as f32)?.reshape(p.shape())?;
            // A quadratic term makes the gradient depend on the parameter.
            let term = ((p.sqr()? * 0.3)? + (p * target)?)?.sum_all()?;
            loss = (loss + term)?;
        }
        opt.step(&loss.backward()?)?;
    }
    let mut out = Vec::new();
    for (name, var) in &named {
        out.push((name.clone(), var.as_tensor().flatten_all()?.to_vec1()?));
    }
    for (name, t) in opt.state()? {
        if t.dtype() == DType::F32 {
            out.push((name, t.flatten_all()?.to_vec1()?));
        }
    }
    Ok(out)
}

/// The fused CPU loops do the tensor ops' f32 arithmetic in the same order, so they agree
/// to the bit: which path ran never changes a model's bytes.
fn assert_paths_agree(config: OptimizerConfig) -> Result<()> {
    let before = fused::fused_updates();
    let fused = train_on_path(&config, false)?;
    // Two parameters, four steps.
    assert_eq!(
        fused::fused_updates() - before,
        8,
        "{config:?}: fused path not taken"
    );
    let reference = train_on_path(&config, true)?;
    assert_eq!(
        fused::fused_updates() - before,
        8,
        "{config:?}: fallback not taken"
    );
    assert_eq!(fused.len(), reference.len(), "{config:?}");
    for ((name, got), (_, want)) in fused.iter().zip(&reference) {
        assert_eq!(got.len(), want.len());
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits(),
                "{config:?}: {name}[{j}] fused {g}, tensor ops {w}"
            );
        }
    }
    Ok(())
}

#[test]
fn fused_steps_match_tensor_ops() -> Result<()> {
    assert_paths_agree(OptimizerConfig::Adadelta {
        lr: 0.5,
        rho: 0.8,
        eps: 1e-4,
        weight_decay: 0.1,
    })?;
    assert_paths_agree(OptimizerConfig::Adam {
        lr: 0.01,
        betas: (0.8, 0.9),
        eps: 1e-6,
        weight_decay: 0.01,
    })?;
    for (momentum, dampening, nesterov) in [(0.0, 0.0, false), (0.9, 0.1, false), (0.9, 0.0, true)]
    {
        assert_paths_agree(OptimizerConfig::Sgd {
            lr: 0.05,
            momentum,
            dampening,
            weight_decay: 0.01,
            nesterov,
        })?;
    }
    Ok(())
}

#[test]
fn unknown_optimizer_names_list_the_valid_ones() {
    let err = toml::from_str::<OptimizerConfig>("name = \"adamw\"")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("adadelta") && err.contains("adam") && err.contains("sgd"),
        "{err}"
    );
    let err = toml::from_str::<OptimizerConfig>("name = \"adam\"\nmomentum = 0.9")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("momentum"), "{err}");
}
