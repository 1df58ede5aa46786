//! Seeded weight initialization: a VarBuilder backend that draws every new variable from a
//! ChaCha8 stream instead of candle's unseedable RNG, so the same seed gives the same model.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarMap};
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

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
    lo + (up - lo) * unit_from_word(rng.next_u32())
}

/// A 32-bit random word as a float in [0, 1) (its top 24 bits).
fn unit_from_word(word: u32) -> f32 {
    (word >> 8) as f32 / (1u32 << 24) as f32
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
pub fn dropout(x: &Tensor, p: f32, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    match dropout_mask(x.elem_count(), p, rng) {
        None => Ok(x.clone()),
        Some(mask) => {
            let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
            x.mul(&mask)
        }
    }
}

/// Mask elements per parallel draw.
const MASK_CHUNK: usize = 16 * 1024;

/// The factors of [`dropout`] for `len` elements: 0 with probability `p`, else 1/(1-p);
/// None when `p` is 0 (nothing drawn).
pub fn dropout_mask(len: usize, p: f32, rng: &mut ChaCha8Rng) -> Option<Vec<f32>> {
    if p <= 0.0 {
        return None;
    }
    let keep_scale = 1.0 / (1.0 - p);
    // The same words, in the same order, as a next_u32 per element, mapped to [0, 1) as
    // `uniform` does, drawn in bulk and in parallel: ChaCha is a counter-based stream, so each
    // chunk's words come from a copy of the generator moved to their position (the baseline's
    // 590k words a step had run on one thread while the other waited).
    let start = rng.get_word_pos();
    let base: &ChaCha8Rng = rng;
    let mut mask = vec![0f32; len];
    // `move`: p and keep_scale by value; taken by reference, the compiler reloaded them for
    // every element and left the loop scalar (5x slower than the serial draw).
    mask.par_chunks_mut(MASK_CHUNK)
        .enumerate()
        .for_each(move |(i, chunk)| {
            let mut at = base.clone();
            at.set_word_pos(start + (i * MASK_CHUNK) as u128);
            let mut words = vec![0u32; chunk.len()];
            at.fill(&mut words[..]);
            for (m, &w) in chunk.iter_mut().zip(&words) {
                *m = if unit_from_word(w) < p {
                    0.0
                } else {
                    keep_scale
                };
            }
        });
    rng.set_word_pos(start + len as u128);
    Some(mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn dropout_draws_one_word_per_element_in_stream_order() -> Result<()> {
        // More elements than a parallel draw takes, ending part way through one.
        let x = Tensor::ones((3, MASK_CHUNK + 1000), DType::F32, &Device::Cpu)?;
        let mut bulk = ChaCha8Rng::seed_from_u64(5);
        // Start part way through a ChaCha block, so that every chunk does.
        for _ in 0..5 {
            bulk.next_u32();
        }
        let mut one_by_one = bulk.clone();
        let y = dropout(&x, 0.25, &mut bulk)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let expected: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if uniform(&mut one_by_one, 0.0, 1.0) < 0.25 {
                    0.0
                } else {
                    1.0 / 0.75
                }
            })
            .collect();
        assert_eq!(y, expected);
        // Both streams end at the same place: the next draws agree.
        assert_eq!(bulk.next_u32(), one_by_one.next_u32());
        let dropped = y.iter().filter(|v| **v == 0.0).count() as f64;
        let share = dropped / y.len() as f64;
        assert!(
            (0.24..0.26).contains(&share),
            "{dropped} of {} dropped",
            y.len()
        );
        Ok(())
    }
}
