//! Profiles the raw CPU kernels (no candle graph) of the baseline's conv2 and pool layers.
use fmnist_nn::ops::{
    conv_backward, conv_forward, pool_backward, pool_forward, ConvGeometry, PoolGeometry,
};
use std::time::Instant;

fn t(name: &str, mut f: impl FnMut()) {
    f();
    let mut v: Vec<f64> = (0..5)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    println!("{name:<30} {:8.2} ms", v[2]);
}

fn main() -> candle_core::Result<()> {
    let g = ConvGeometry::new((64, 32, 26, 26), (64, 32, 3, 3), 1, 0)?;
    let x: Vec<f32> = (0..64 * 32 * 26 * 26)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let w: Vec<f32> = (0..64 * 32 * 9)
        .map(|i| ((i * 31) % 100) as f32 / 100.0)
        .collect();
    let gy: Vec<f32> = (0..64 * 64 * 24 * 24)
        .map(|i| ((i * 13) % 100) as f32 / 100.0)
        .collect();
    t("conv2 fwd", || {
        conv_forward(&g, &x, &w, None, false);
    });
    t("conv2 bwd w only", || {
        conv_backward(&g, &x, &w, &gy, (false, true, false));
    });
    t("conv2 bwd x only", || {
        conv_backward(&g, &x, &w, &gy, (true, false, false));
    });
    t("conv2 bwd all", || {
        conv_backward(&g, &x, &w, &gy, (true, true, true));
    });
    let pg = PoolGeometry::new((64, 64, 24, 24), 2, 2, 0)?;
    let (_, idx) = pool_forward(&pg, &gy);
    let py = vec![1f32; 64 * 64 * 144];
    t("pool fwd", || {
        pool_forward(&pg, &gy);
    });
    t("pool bwd", || {
        pool_backward(&pg, &idx, &py);
    });
    Ok(())
}
