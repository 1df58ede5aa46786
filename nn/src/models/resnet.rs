//! ResNet-18 (torchvision layout: BasicBlocks [2, 2, 2, 2], batch norm, 1x1 downsample) with a
//! 1-channel stem and 10 classes. Parameter names match torchvision's state dict.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

use super::baseline::{linear, Conv, Linear};
use super::batch_norm::BatchNorm;
use super::init::kaiming_normal_fan_out;
use super::Classifier;
use crate::ops;

/// A bias-free conv with torchvision's kaiming_normal(fan_out) init.
fn conv_no_bias(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv> {
    let weight = vb.get_with_hints(
        (out_channels, in_channels, kernel, kernel),
        "weight",
        kaiming_normal_fan_out(out_channels, kernel),
    )?;
    Ok(Conv {
        weight,
        bias: None,
        stride,
        padding,
    })
}

/// `bn(conv(x))`, then ReLU if `relu`. In eval mode the batch norm is folded into the conv's
/// weights (one op instead of two passes over the activations).
fn conv_bn(conv: &Conv, bn: &BatchNorm, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
    if train {
        return bn.forward(&conv.forward(x)?, train, relu);
    }
    let folded = folded(conv, bn)?;
    if relu {
        folded.forward_relu(x)
    } else {
        folded.forward(x)
    }
}

/// `conv` with eval-mode `bn` folded into its weight and bias, detached from the autograd
/// graph (eval mode needs no gradients; the ops then skip their backward bookkeeping).
fn folded(conv: &Conv, bn: &BatchNorm) -> Result<Conv> {
    let (weight, bias) = bn.fold_into_conv(&conv.weight, conv.bias.as_ref())?;
    Ok(Conv {
        weight: weight.detach(),
        bias: Some(bias.detach()),
        stride: conv.stride,
        padding: conv.padding,
    })
}

/// The stem's max pooling after conv1/bn1/ReLU.
const STEM_POOL: ops::MaxPool = ops::MaxPool {
    kernel: 3,
    stride: 2,
    padding: 1,
};

struct BasicBlock {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    downsample: Option<(Conv, BatchNorm)>,
}

impl BasicBlock {
    fn new(vb: VarBuilder, in_channels: usize, out_channels: usize, stride: usize) -> Result<Self> {
        let downsample = if stride != 1 || in_channels != out_channels {
            let ds = vb.pp("downsample");
            Some((
                conv_no_bias(ds.pp("0"), in_channels, out_channels, 1, stride, 0)?,
                BatchNorm::new(ds.pp("1"), out_channels)?,
            ))
        } else {
            None
        };
        Ok(BasicBlock {
            conv1: conv_no_bias(vb.pp("conv1"), in_channels, out_channels, 3, stride, 1)?,
            bn1: BatchNorm::new(vb.pp("bn1"), out_channels)?,
            conv2: conv_no_bias(vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?,
            bn2: BatchNorm::new(vb.pp("bn2"), out_channels)?,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = conv_bn(&self.conv1, &self.bn1, x, train, true)?;
        let h = conv_bn(&self.conv2, &self.bn2, &h, train, false)?;
        let shortcut = match &self.downsample {
            Some((conv, bn)) => conv_bn(conv, bn, x, train, false)?,
            None => x.clone(),
        };
        ops::add_relu(&h, &shortcut)
    }

    fn param_count(&self) -> usize {
        let ds = self
            .downsample
            .as_ref()
            .map_or(0, |(c, bn)| c.weight.elem_count() + bn.param_count());
        self.conv1.weight.elem_count()
            + self.bn1.param_count()
            + self.conv2.weight.elem_count()
            + self.bn2.param_count()
            + ds
    }
}

pub struct ResNet18 {
    conv1: Conv,
    bn1: BatchNorm,
    layers: Vec<Vec<BasicBlock>>,
    fc: Linear,
}

const STAGE_WIDTHS: [usize; 4] = [64, 128, 256, 512];
const BLOCKS_PER_STAGE: usize = 2;

impl ResNet18 {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let conv1 = conv_no_bias(vb.pp("conv1"), 1, 64, 7, 2, 3)?;
        let bn1 = BatchNorm::new(vb.pp("bn1"), 64)?;
        let mut layers = Vec::with_capacity(STAGE_WIDTHS.len());
        let mut in_channels = 64;
        for (i, &width) in STAGE_WIDTHS.iter().enumerate() {
            let stage_vb = vb.pp(format!("layer{}", i + 1));
            let mut blocks = Vec::with_capacity(BLOCKS_PER_STAGE);
            for b in 0..BLOCKS_PER_STAGE {
                let stride = if i > 0 && b == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(stage_vb.pp(b), in_channels, width, stride)?);
                in_channels = width;
            }
            layers.push(blocks);
        }
        let fc = linear(vb.pp("fc"), 512, 10)?;
        Ok(ResNet18 {
            conv1,
            bn1,
            layers,
            fc,
        })
    }

    fn stem(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        conv_bn(&self.conv1, &self.bn1, x, train, true)
    }

    fn run(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // Eval mode pools each chunk of the folded stem conv's output in cache.
        let mut h = if train {
            let p = STEM_POOL;
            ops::max_pool2d(&self.stem(x, train)?, p.kernel, p.stride, p.padding)?
        } else {
            folded(&self.conv1, &self.bn1)?.forward_relu_pool(x, STEM_POOL)?
        };
        for stage in &self.layers {
            for block in stage {
                h = block.forward(&h, train)?;
            }
        }
        // Adaptive average pooling to 1x1 = the mean over the spatial dims.
        let pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
        self.fc.forward(&pooled)
    }
}

impl Classifier for ResNet18 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// No dropout in ResNet: the RNG is unused; batch norm uses batch statistics and updates
    /// its running statistics.
    fn forward_train(&self, x: &Tensor, _rng: &mut ChaCha8Rng) -> Result<Tensor> {
        self.run(x, true)
    }

    fn first_conv_weight(&self) -> &Tensor {
        &self.conv1.weight
    }

    fn feature_maps(&self, x: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let stem = self.stem(x, false)?;
        let p = STEM_POOL;
        let mut h = ops::max_pool2d(&stem, p.kernel, p.stride, p.padding)?;
        for block in &self.layers[0] {
            h = block.forward(&h, false)?;
        }
        Ok(vec![("conv1".into(), stem), ("layer1".into(), h)])
    }

    fn param_count(&self) -> usize {
        self.conv1.weight.elem_count()
            + self.bn1.param_count()
            + self
                .layers
                .iter()
                .flatten()
                .map(BasicBlock::param_count)
                .sum::<usize>()
            + self.fc.param_count()
    }
}
