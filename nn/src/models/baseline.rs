//! The baseline CNN (PyTorch's MNIST example shape): two 3x3 convs, max-pool, dropout, two
//! fully connected layers. Parameter names match the PyTorch module's state dict.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

use super::init::{dropout, dropout_mask, torch_default};
use super::Classifier;
use crate::ops;

/// A 2-D convolution layer whose forward goes through `ops::conv2d` (the fast CPU kernels).
#[derive(Debug, Clone)]
pub struct Conv {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv {
    /// Conv with a bias, PyTorch's default init.
    pub fn with_bias(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
    ) -> Result<Self> {
        let init = torch_default(in_channels * kernel * kernel);
        let weight =
            vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", init)?;
        let bias = vb.get_with_hints(out_channels, "bias", init)?;
        Ok(Conv {
            weight,
            bias: Some(bias),
            stride: 1,
            padding: 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
        )
    }

    /// `relu(self.forward(x))`, fused.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d_relu(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
        )
    }

    /// The same layer with its parameters cut from the autograd graph (eval mode needs no
    /// gradients; candle then records no graph and the ops skip backward bookkeeping).
    pub fn detached(&self) -> Conv {
        Conv {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            ..*self
        }
    }

    /// `flatten_from(1)(max_pool2d(relu(self.forward(x)), pool) * mask)`, fused (`mask`: a
    /// dropout mask over the pooled output, or None).
    pub fn forward_relu_pool_flat(
        &self,
        x: &Tensor,
        pool: ops::MaxPool,
        mask: Option<Vec<f32>>,
    ) -> Result<Tensor> {
        ops::conv2d_relu_pool_flat(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
            pool,
            mask,
        )
    }

    /// `max_pool2d(relu(self.forward(x)), pool)`, fused.
    pub fn forward_relu_pool(&self, x: &Tensor, pool: ops::MaxPool) -> Result<Tensor> {
        ops::conv2d_relu_pool(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
            pool,
        )
    }
}

/// A fully connected layer (weight [out, in], bias [out]) whose forward goes through
/// `ops::linear` (the fast CPU kernel).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, &self.bias, false)
    }

    /// `relu(self.forward(x))`, fused.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, &self.bias, true)
    }

    pub fn param_count(&self) -> usize {
        self.weight.elem_count() + self.bias.elem_count()
    }

    /// See [`Conv::detached`].
    pub fn detached(&self) -> Linear {
        Linear {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
        }
    }
}

/// A linear layer with PyTorch's default init (weight and bias U(±1/sqrt(fan_in))).
pub fn linear(vb: VarBuilder, in_features: usize, out_features: usize) -> Result<Linear> {
    let init = torch_default(in_features);
    let weight = vb.get_with_hints((out_features, in_features), "weight", init)?;
    let bias = vb.get_with_hints(out_features, "bias", init)?;
    Ok(Linear { weight, bias })
}

pub struct Baseline {
    conv1: Conv,
    conv2: Conv,
    fc1: Linear,
    fc2: Linear,
}

const POOL: ops::MaxPool = ops::MaxPool {
    kernel: 2,
    stride: 2,
    padding: 0,
};
const DROPOUT_CONV: f32 = 0.25;
/// conv2's pooled output per image: 64 channels of 12x12 (fc1's inputs).
const POOLED_FEATURES: usize = 9216;
const DROPOUT_FC: f32 = 0.5;

impl Baseline {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Baseline {
            conv1: Conv::with_bias(vb.pp("conv1"), 1, 32, 3)?,
            conv2: Conv::with_bias(vb.pp("conv2"), 32, 64, 3)?,
            fc1: linear(vb.pp("fc1"), POOLED_FEATURES, 128)?,
            fc2: linear(vb.pp("fc2"), 128, 10)?,
        })
    }

    fn conv_stages(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let c1 = self.conv1.forward_relu(x)?;
        let c2 = self.conv2.forward_relu(&c1)?;
        Ok((c1, c2))
    }

    /// The model with every parameter detached (see [`Conv::detached`]), for eval mode.
    fn detached(&self) -> Baseline {
        Baseline {
            conv1: self.conv1.detached(),
            conv2: self.conv2.detached(),
            fc1: self.fc1.detached(),
            fc2: self.fc2.detached(),
        }
    }

    /// `rng` is Some in training mode (dropout on), None in eval mode.
    fn run(&self, x: &Tensor, mut rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let c1 = self.conv1.forward_relu(x)?;
        // The dropout after the pool is drawn here and applied inside the conv op.
        let mask = match rng.as_deref_mut() {
            Some(r) => dropout_mask(x.dim(0)? * POOLED_FEATURES, DROPOUT_CONV, r),
            None => None,
        };
        let h = self.conv2.forward_relu_pool_flat(&c1, POOL, mask)?;
        let mut h = self.fc1.forward_relu(&h)?;
        if let Some(r) = rng {
            h = dropout(&h, DROPOUT_FC, r)?;
        }
        self.fc2.forward(&h)
    }
}

impl Classifier for Baseline {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.detached().run(x, None)
    }

    fn forward_train(&self, x: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        self.run(x, Some(rng))
    }

    fn first_conv_weight(&self) -> &Tensor {
        &self.conv1.weight
    }

    fn feature_maps(&self, x: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let (c1, c2) = self.conv_stages(x)?;
        Ok(vec![("conv1".into(), c1), ("conv2".into(), c2)])
    }

    fn param_count(&self) -> usize {
        let conv = |c: &Conv| c.weight.elem_count() + c.bias.as_ref().map_or(0, |b| b.elem_count());
        conv(&self.conv1) + conv(&self.conv2) + self.fc1.param_count() + self.fc2.param_count()
    }
}
