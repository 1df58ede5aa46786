//! Per-layer convolution times of ResNet-18 at batch 64 (forward, and backward with the input
//! and weight gradients): where a training step's convolution time goes, layer by layer.
//! `RAYON_NUM_THREADS=2 cargo run --release -p fmnist-nn --example layer_times`;
//! `ONLY=<name prefix>` times one layer, `REPS=<n>` repeats (median reported), `PARTS=1` also
//! times the input and the weight gradient on their own.

use fmnist_nn::ops::{conv_backward, conv_forward, ConvGeometry};
use std::time::Instant;

#[global_allocator]
static ALLOC: fmnist_nn::ops::HugePageAlloc = fmnist_nn::ops::HugePageAlloc;

fn main() {
    fmnist_nn::ops::tune_allocator_for_training();
    let n = 64;
    // (name, cin, hw, cout, k, stride, pad, convs of this shape per step, input gradient)
    let layers = [
        ("stem 7x7/2", 1, 28, 64, 7, 2, 3, 1, false),
        ("l1 3x3", 64, 7, 64, 3, 1, 1, 4, true),
        ("l2.0 3x3/2", 64, 7, 128, 3, 2, 1, 1, true),
        ("l2.0 ds 1x1/2", 64, 7, 128, 1, 2, 0, 1, true),
        ("l2 3x3", 128, 4, 128, 3, 1, 1, 3, true),
        ("l3.0 3x3/2", 128, 4, 256, 3, 2, 1, 1, true),
        ("l3.0 ds 1x1/2", 128, 4, 256, 1, 2, 0, 1, true),
        ("l3 3x3", 256, 2, 256, 3, 1, 1, 3, true),
        ("l4.0 3x3/2", 256, 2, 512, 3, 2, 1, 1, true),
        ("l4.0 ds 1x1/2", 256, 2, 512, 1, 2, 0, 1, true),
        ("l4 3x3", 512, 1, 512, 3, 1, 1, 3, true),
        ("base c1 3x3", 1, 28, 32, 3, 1, 0, 1, false),
        ("base c2 3x3", 32, 26, 64, 3, 1, 0, 1, true),
    ];
    let (mut tf, mut tb) = (0.0, 0.0);
    let only = std::env::var("ONLY").ok();
    for (name, cin, hw, cout, k, s, p, count, want_x) in layers {
        if only.as_deref().is_some_and(|o| !name.starts_with(o)) {
            continue;
        }
        let g = ConvGeometry::new((n, cin, hw, hw), (cout, cin, k, k), s, p).unwrap();
        let x: Vec<f32> = (0..n * cin * hw * hw)
            .map(|i| ((i as f32) * 0.37).sin())
            .collect();
        let w: Vec<f32> = (0..cout * cin * k * k)
            .map(|i| ((i as f32) * 0.11).cos() * 0.05)
            .collect();
        let gy: Vec<f32> = (0..n * cout * g.out_height * g.out_width)
            .map(|i| ((i as f32) * 0.7).sin())
            .collect();
        let reps: usize = std::env::var("REPS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(20)
            .max(1);
        let mut f = Vec::new();
        let mut b = Vec::new();
        let (mut bx, mut bw) = (Vec::new(), Vec::new());
        let parts = std::env::var_os("PARTS").is_some();
        for _ in 0..reps {
            if parts {
                let t = Instant::now();
                std::hint::black_box(conv_backward(&g, &x, &w, &gy, (want_x, false, false)));
                bx.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                std::hint::black_box(conv_backward(&g, &x, &w, &gy, (false, true, false)));
                bw.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let t = Instant::now();
            std::hint::black_box(conv_forward(&g, &x, &w, None, false));
            f.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            std::hint::black_box(conv_backward(&g, &x, &w, &gy, (want_x, true, false)));
            b.push(t.elapsed().as_secs_f64() * 1e3);
        }
        f.sort_by(|a, b| a.partial_cmp(b).unwrap());
        b.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (fm, bm) = (f[reps / 2], b[reps / 2]);
        if parts {
            bx.sort_by(|a, b| a.partial_cmp(b).unwrap());
            bw.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "{name:>14}: input grad {:6.2} ms, weight grad {:6.2} ms",
                bx[reps / 2],
                bw[reps / 2]
            );
        }
        let fl = g.flops() / 1e9;
        println!(
            "{name:>14}: fwd {fm:6.2} ms ({:5.1} GF/s)  bwd {bm:6.2} ms ({:5.1} GF/s)  x{count} -> {:6.2} ms",
            fl / fm * 1e3,
            fl * 2.0 / bm * 1e3,
            (fm + bm) * count as f64
        );
        tf += fm * count as f64;
        tb += bm * count as f64;
    }
    println!("total conv fwd {tf:.1} ms, bwd {tb:.1} ms");
}
