//! The Winograd path against the im2col path it replaces (forward, pooled epilogue, pooled
//! weight and input gradients): a module of its own, so neither path imports the other.
use super::super::conv::im2col_forward;
use super::super::conv_backward::{im2col_backward, OutputGrad};
use super::super::conv_geometry::ConvGeometry;
use super::super::pool::{pool_forward, PoolGeometry};
use super::*;

use crate::test_support::pseudo_random;

use crate::check::max_abs_diff as max_diff;

/// A 3x3 layer `(batch, cin, cout, height, width, padding)` with pseudo-random input and weights
/// (`seed`, `seed + 1`), the 2x2/2 max pool of its ReLU output, and a pseudo-random gradient
/// at the pool (`seed + 2`): the layer, x, w, the pool, its argmax indices, the gradient.
#[allow(clippy::type_complexity)]
fn pooled_case(
    (batch, cin, cout, h, w, p): (usize, usize, usize, usize, usize, usize),
    seed: u64,
) -> (
    ConvGeometry,
    Vec<f32>,
    Vec<f32>,
    PoolGeometry,
    Vec<u32>,
    Vec<f32>,
) {
    let g = ConvGeometry::new((batch, cin, h, w), (cout, cin, 3, 3), 1, p).unwrap();
    let x = pseudo_random(batch * cin * h * w, seed);
    let wt = pseudo_random(cout * cin * 9, seed + 1);
    let conv = im2col_forward(&g, &x, &wt, None, true);
    let pool = PoolGeometry::new((batch, cout, g.out_height, g.out_width), 2, 2, 0).unwrap();
    let (_, indices) = pool_forward(&pool, &conv);
    let grad = pseudo_random(indices.len(), seed + 2);
    (g, x, wt, pool, indices, grad)
}

/// Panics unless `got` is within 1e-4 of `want`'s largest magnitude (at least 1) everywhere.
fn assert_close(got: &[f32], want: &[f32], case: &str) {
    assert_eq!(got.len(), want.len(), "{case}");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let d = max_diff(got, want);
    assert!(d < 1e-4 * scale, "{case}: {d} (scale {scale})");
}

#[test]
fn matches_im2col_forward_on_odd_and_even_maps_and_paddings() {
    for &(cin, cout, h, w, p) in &[
        (8, 16, 26, 26, 0),
        (9, 8, 11, 13, 1),
        (16, 12, 10, 9, 2),
        (8, 8, 12, 12, 1),
        // More than 16 tiles across: a tile row in two vectors.
        (8, 8, 9, 40, 1),
    ] {
        let g = ConvGeometry::new((3, cin, h, w), (cout, cin, 3, 3), 1, p).unwrap();
        assert!(suits(&g));
        let x = pseudo_random(3 * cin * h * w, 1);
        let wt = pseudo_random(cout * cin * 9, 2);
        let b = pseudo_random(cout, 3);
        for relu in [false, true] {
            let want = im2col_forward(&g, &x, &wt, Some(&b), relu);
            let (got, idx) = forward(
                &g,
                &x,
                &wt,
                Epilogue::Map {
                    bias: Some(&b),
                    relu,
                },
            );
            assert!(idx.is_none());
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "{cin}->{cout} {h}x{w} p{p} relu {relu}: {d}");
        }
    }
}

#[test]
fn pooled_epilogue_matches_conv_then_pool_with_indices() {
    let g = ConvGeometry::new((2, 8, 14, 14), (8, 8, 3, 3), 1, 0).unwrap();
    assert!(suits_pooled(&g, 2, 2, 0));
    let x = pseudo_random(2 * 8 * 14 * 14, 4);
    let wt = pseudo_random(8 * 8 * 9, 5);
    let b = pseudo_random(8, 6);
    let conv = im2col_forward(&g, &x, &wt, Some(&b), true);
    let pg = PoolGeometry::new((2, 8, 12, 12), 2, 2, 0).unwrap();
    let (want, want_idx) = pool_forward(&pg, &conv);
    let (got, idx) = forward(
        &g,
        &x,
        &wt,
        Epilogue::Pooled {
            bias: Some(&b),
            relu: true,
            indices: true,
        },
    );
    assert!(max_diff(&got, &want) < 1e-4);
    // Winograd rounds differently, so a near-tie may pick the other pixel; ReLU zeros tie
    // exactly (all four clamp to 0) and then both pick the first.
    let idx = idx.unwrap();
    let agree = idx.iter().zip(&want_idx).filter(|(a, b)| a == b).count();
    assert!(agree * 100 >= idx.len() * 99, "{agree} of {}", idx.len());
    let (values, none) = forward(
        &g,
        &x,
        &wt,
        Epilogue::Pooled {
            bias: Some(&b),
            relu: true,
            indices: false,
        },
    );
    assert!(none.is_none());
    assert_eq!(values, got);
}

#[test]
fn pooled_gradients_match_im2col() {
    // (batch, cin, cout, height, width, padding): the baseline's conv2 (more images than
    // groups), odd channel counts (12 output channels: the weight gradient's gemm fallback),
    // padding 1 and 2, a map wider than high (tile rows and columns not interchangeable).
    for case in [
        (10, 32, 64, 26, 26, 0),
        (3, 9, 12, 12, 12, 1),
        (2, 8, 8, 8, 8, 2),
        (2, 8, 16, 10, 16, 1),
    ] {
        let (g, x, wt, pool, indices, grad) = pooled_case(case, 11);
        let source = OutputGrad::Pooled {
            pool: &pool,
            indices: &indices,
            grad: &grad,
        };
        let want = im2col_backward(&g, &x, &wt, source, (true, true, false));
        let (want_x, want_w) = (want.x.unwrap(), want.w.unwrap());
        let got_w = weight_grad_pooled(&g, &x, &pool, &indices, &grad).expect("suits");
        assert_close(&got_w, &want_w, &format!("weight gradient {case:?}"));
        let got_x = input_grad_pooled(&g, &wt, &pool, &indices, &grad).expect("suits");
        assert_close(&got_x, &want_x, &format!("input gradient {case:?}"));
    }
}

#[test]
fn pooled_gradients_refuse_what_does_not_suit() {
    // A 3x3/2 pool (ResNet's stem) is not a tile: no Winograd.
    let g = ConvGeometry::new((1, 8, 10, 10), (8, 8, 3, 3), 1, 1).unwrap();
    let pool = PoolGeometry::new((1, 8, 10, 10), 3, 2, 1).unwrap();
    let n = 8 * pool.out_height * pool.out_width;
    let (x, w) = (vec![0f32; 800], vec![0f32; 8 * 8 * 9]);
    assert!(weight_grad_pooled(&g, &x, &pool, &vec![0; n], &vec![0.0; n]).is_none());
    assert!(input_grad_pooled(&g, &w, &pool, &vec![0; n], &vec![0.0; n]).is_none());
    // Indices outside their window: off the plane (im2col's path reports it), on the plane
    // but in another tile, and before the tile's corner (the offset wraps): no Winograd for
    // either gradient.
    let pool = PoolGeometry::new((1, 8, 10, 10), 2, 2, 0).unwrap();
    let n = 8 * pool.out_height * pool.out_width;
    let grad = vec![1.0; n];
    let in_own_tile: Vec<u32> = (0..n as u32)
        .map(|i| {
            let t = i % 25;
            2 * (t / 5) * 10 + 2 * (t % 5)
        })
        .collect();
    assert!(input_grad_pooled(&g, &w, &pool, &in_own_tile, &grad).is_some());
    assert!(weight_grad_pooled(&g, &x, &pool, &in_own_tile, &grad).is_some());
    for (at, bad) in [(3, 100), (3, 0), (0, 0)] {
        // Value `at` of the first plane gets index `bad`: tile 3's corner is pixel 6, so 0 is
        // before it; tile 0 owns 0, so (0, 0) stays valid and must be accepted.
        let mut indices = in_own_tile.clone();
        indices[at] = bad;
        let valid = (at, bad) == (0, 0);
        let got_x = input_grad_pooled(&g, &w, &pool, &indices, &grad);
        let got_w = weight_grad_pooled(&g, &x, &pool, &indices, &grad);
        assert_eq!(
            got_x.is_some(),
            valid,
            "input gradient, index {bad} at {at}"
        );
        assert_eq!(
            got_w.is_some(),
            valid,
            "weight gradient, index {bad} at {at}"
        );
    }
    let other_tile = in_own_tile.iter().map(|&i| i + 2).collect::<Vec<_>>();
    assert!(input_grad_pooled(&g, &w, &pool, &other_tile, &grad).is_none());
    assert!(weight_grad_pooled(&g, &x, &pool, &other_tile, &grad).is_none());
}
