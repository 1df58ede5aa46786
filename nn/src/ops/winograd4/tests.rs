//! F(4x4, 3x3) against the im2col path it replaces: forward (bias, ReLU), input and weight
//! gradients, on the maps it takes, odd sizes and every padding.
use super::super::conv::im2col_forward;
use super::super::conv_backward::{conv_backward_from, im2col_backward, OutputGrad};
use super::*;
use crate::check::max_abs_diff;

use crate::test_support::pseudo_random;

/// Largest |a - b| against the largest |b|: F(4x4, 3x3) rounds more than im2col (its
/// transforms scale by up to 8 and 1/24), within f32 noise for these sizes.
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let worst = max_abs_diff(got, want);
    assert!(
        worst <= 2e-5 * scale,
        "{what}: max diff {worst} vs scale {scale}"
    );
}

const CASES: [(usize, usize, usize, usize, usize, usize); 6] = [
    // (batch, cin, cout, height, width, padding)
    (5, 64, 64, 7, 7, 1),
    (70, 16, 24, 4, 4, 1),
    (3, 8, 9, 5, 6, 1),
    (2, 12, 8, 6, 8, 0),
    (3, 8, 16, 4, 5, 2),
    (300, 8, 8, 4, 4, 1),
];

#[test]
fn forward_matches_im2col() {
    for (i, &(batch, cin, cout, h, w, p)) in CASES.iter().enumerate() {
        let g = ConvGeometry::new((batch, cin, h, w), (cout, cin, 3, 3), 1, p).unwrap();
        assert!(suits(&g), "case {i}");
        let x = pseudo_random(batch * cin * h * w, 1 + i as u64);
        let wt = pseudo_random(cout * cin * 9, 20 + i as u64);
        let b = pseudo_random(cout, 40 + i as u64);
        for relu in [false, true] {
            let want = im2col_forward(&g, &x, &wt, Some(&b), relu);
            let got = forward(&g, &x, &wt, Some(&b), relu);
            assert_close(&format!("case {i} relu {relu}"), &got, &want);
        }
    }
}

#[test]
fn input_grad_matches_im2col() {
    for (i, &(batch, cin, cout, h, w, p)) in CASES.iter().enumerate() {
        let g = ConvGeometry::new((batch, cin, h, w), (cout, cin, 3, 3), 1, p).unwrap();
        let x = pseudo_random(batch * cin * h * w, 1 + i as u64);
        let wt = pseudo_random(cout * cin * 9, 20 + i as u64);
        let gy = pseudo_random(batch * g.out_image_len(), 60 + i as u64);
        let want = im2col_backward(&g, &x, &wt, OutputGrad::Dense(&gy), (true, false, false));
        let want = want.x.unwrap();
        match input_grad(&g, &wt, &gy) {
            Some(got) => assert_close(&format!("case {i}"), &got, &want),
            // Only where the backward map falls outside the tiles' range (6x8 out of 8x10).
            None => assert_eq!(i, 3, "case {i} has no Winograd input gradient"),
        }
    }
}

#[test]
fn weight_grad_matches_im2col() {
    for (i, &(batch, cin, cout, h, w, p)) in CASES.iter().enumerate() {
        let g = ConvGeometry::new((batch, cin, h, w), (cout, cin, 3, 3), 1, p).unwrap();
        let x = pseudo_random(batch * cin * h * w, 1 + i as u64);
        let wt = pseudo_random(cout * cin * 9, 20 + i as u64);
        let gy = pseudo_random(batch * g.out_image_len(), 60 + i as u64);
        let want = im2col_backward(&g, &x, &wt, OutputGrad::Dense(&gy), (false, true, false));
        let got = weight_grad(&g, &x, &gy);
        assert_close(&format!("case {i}"), &got, &want.w.unwrap());
    }
}

/// The backward pass as the ops call it, for every combination of wanted gradients: the same
/// gradients as im2col's, the bias's beside the Winograd weight gradient, and the input
/// gradient through im2col where Winograd has none (case 3).
#[test]
fn backward_routes_every_wanted_gradient() {
    let wants = [
        (true, true, true),
        (false, true, true),
        (true, false, false),
        (false, true, false),
        (false, false, true),
    ];
    for (i, &(batch, cin, cout, h, w, p)) in CASES.iter().enumerate() {
        let g = ConvGeometry::new((batch, cin, h, w), (cout, cin, 3, 3), 1, p).unwrap();
        let x = pseudo_random(batch * cin * h * w, 1 + i as u64);
        let wt = pseudo_random(cout * cin * 9, 20 + i as u64);
        let gy = pseudo_random(batch * g.out_image_len(), 60 + i as u64);
        for want in wants {
            let got = conv_backward_from(&g, &x, &wt, OutputGrad::Dense(&gy), want);
            let reference = im2col_backward(&g, &x, &wt, OutputGrad::Dense(&gy), want);
            for (what, got, reference) in [
                ("input", got.x, reference.x),
                ("weight", got.w, reference.w),
                ("bias", got.bias, reference.bias),
            ] {
                let label = format!("case {i} {want:?} {what}");
                match (got, reference) {
                    (Some(got), Some(reference)) => assert_close(&label, &got, &reference),
                    (None, None) => {}
                    (got, _) => panic!("{label}: present {} vs im2col's", got.is_some()),
                }
            }
        }
    }
}

#[test]
fn leaves_other_layers_alone() {
    let g = |size: usize, k: usize, s: usize| {
        ConvGeometry::new((2, 64, size, size), (64, 64, k, k), s, k / 2).unwrap()
    };
    assert!(suits(&g(7, 3, 1)) && suits(&g(4, 3, 1)));
    assert!(!suits(&g(2, 3, 1)), "2x2: the dense form's");
    assert!(!suits(&g(7, 3, 2)), "stride 2");
    assert!(!suits(&g(24, 3, 1)), "wide maps: F(2x2, 3x3)'s");
    assert!(!suits(&g(7, 1, 1)), "1x1");
}
