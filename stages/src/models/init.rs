//! Seeded weight initialization: a VarBuilder backend that draws every new variable from a
//! ChaCha8 stream instead of candle's unseedable RNG, so the same seed gives the same model.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarMap};
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;

/// A `VarBuilder` backend that creates missing variables in `varmap`, drawing random ones from
/// `rng` in the order the model asks for them (construction order is fixed, so the draw is).
pub struct SeededInit<'a> {
    varmap: &'a VarMap,
    rng: Mutex<ChaCha8Rng>,
}

impl<'a> SeededInit<'a> {
    pub fn new(varmap: &'a VarMap, rng: ChaCha8Rng) -> Self {
        SeededInit {
            varmap,
            rng: Mutex::new(rng),
        }
    }

    fn draw(&self, count: usize, init: Init) -> Result<Vec<f32>> {
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("weight-init RNG lock poisoned".into()))?;
        Ok(match init {
            Init::Const(v) => vec![v as f32; count],
            Init::Uniform { lo, up } => (0..count)
                .map(|_| uniform(&mut *rng, lo as f32, up as f32))
                .collect(),
            Init::Randn { mean, stdev } => (0..count)
                .map(|_| (mean + stdev * standard_normal(&mut rng)) as f32)
                .collect(),
            Init::Kaiming { .. } => candle_core::bail!(
                "seeded init: pass explicit Uniform/Randn bounds instead of Init::Kaiming"
            ),
        })
    }
}

/// U[lo, up) from 24 random bits (exactly representable in f32, platform independent).
fn uniform(rng: &mut dyn RngCore, lo: f32, up: f32) -> f32 {
    let unit = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
    lo + (up - lo) * unit
}

/// Box-Muller on f64, so the draw does not depend on a distribution crate's algorithm.
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]: ln is finite
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl candle_nn::var_builder::SimpleBackend for SeededInit<'_> {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("var map lock poisoned".into()))?;
        if let Some(existing) = vars.get(name) {
            if existing.shape() != &s {
                candle_core::bail!(
                    "variable {name} has shape {:?}, the model expects {:?}",
                    existing.shape(),
                    s
                );
            }
            return Ok(existing.as_tensor().clone());
        }
        let values = self.draw(s.elem_count(), h)?;
        let tensor = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let vars = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("var map lock poisoned".into()))?;
        match vars.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|v| v.contains_key(name))
            .unwrap_or(false)
    }
}

/// PyTorch's default for Conv2d/Linear weights and biases (kaiming_uniform with a = sqrt(5)
/// reduces to this bound): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub fn torch_default(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// torchvision's ResNet conv init: kaiming_normal(mode="fan_out", nonlinearity="relu"),
/// std = sqrt(2 / fan_out) with fan_out = Cout * K * K.
pub fn kaiming_normal_fan_out(out_channels: usize, kernel: usize) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: (2.0 / (out_channels * kernel * kernel) as f64).sqrt(),
    }
}

/// Dropout in training mode with a mask drawn from `rng`: zero each element with probability
/// `p`, scale the rest by 1/(1-p) (PyTorch's inverted dropout).
pub fn dropout(x: &Tensor, p: f32, rng: &mut dyn RngCore) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep_scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if uniform(rng, 0.0, 1.0) < p {
                0.0
            } else {
                keep_scale
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}
