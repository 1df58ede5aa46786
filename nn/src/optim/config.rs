//! The `optimizer` table of a train stage, its validation, and the optimizer it builds.

use candle_core::{Result, Var};

use super::{Adadelta, Adam, Optimizer, Sgd, Stateful};

/// The `optimizer` table of a train stage: `name` picks the algorithm, the other keys are its
/// settings (PyTorch's defaults when absent).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "name", rename_all = "lowercase", deny_unknown_fields)]
pub enum OptimizerConfig {
    Adadelta {
        #[serde(default = "one")]
        lr: f64,
        #[serde(default = "adadelta_rho")]
        rho: f64,
        #[serde(default = "adadelta_eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
    },
    Adam {
        #[serde(default = "adam_lr")]
        lr: f64,
        #[serde(default = "adam_betas")]
        betas: (f64, f64),
        #[serde(default = "adam_eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
    },
    Sgd {
        #[serde(default = "sgd_lr")]
        lr: f64,
        #[serde(default)]
        momentum: f64,
        #[serde(default)]
        dampening: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default)]
        nesterov: bool,
    },
}

fn one() -> f64 {
    1.0
}
fn adadelta_rho() -> f64 {
    0.9
}
fn adadelta_eps() -> f64 {
    1e-6
}
fn adam_lr() -> f64 {
    1e-3
}
fn adam_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn adam_eps() -> f64 {
    1e-8
}
fn sgd_lr() -> f64 {
    1e-3
}

/// The seed study's optimizer for each model: Adadelta lr 1.0 for the baseline, Adam lr 1e-4
/// for the ResNet-18 (PyTorch's defaults otherwise).
pub fn study_optimizer(kind: crate::models::ModelKind) -> OptimizerConfig {
    match kind {
        crate::models::ModelKind::Baseline => OptimizerConfig::Adadelta {
            lr: 1.0,
            rho: adadelta_rho(),
            eps: adadelta_eps(),
            weight_decay: 0.0,
        },
        crate::models::ModelKind::Resnet18 => OptimizerConfig::Adam {
            lr: 1e-4,
            betas: adam_betas(),
            eps: adam_eps(),
            weight_decay: 0.0,
        },
    }
}

impl OptimizerConfig {
    /// The initial learning rate.
    pub fn lr(&self) -> f64 {
        match *self {
            OptimizerConfig::Adadelta { lr, .. }
            | OptimizerConfig::Adam { lr, .. }
            | OptimizerConfig::Sgd { lr, .. } => lr,
        }
    }

    /// Settings PyTorch would reject (negative rates, decay factors outside [0, 1), ...).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let in_unit = |v: f64| (0.0..1.0).contains(&v);
        let check = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
        match *self {
            OptimizerConfig::Adadelta {
                lr,
                rho,
                eps,
                weight_decay,
            } => {
                check(lr >= 0.0, "optimizer.lr must be >= 0")?;
                check(
                    (0.0..=1.0).contains(&rho),
                    "optimizer.rho must be in [0, 1]",
                )?;
                check(eps >= 0.0, "optimizer.eps must be >= 0")?;
                check(weight_decay >= 0.0, "optimizer.weight_decay must be >= 0")
            }
            OptimizerConfig::Adam {
                lr,
                betas,
                eps,
                weight_decay,
            } => {
                check(lr >= 0.0, "optimizer.lr must be >= 0")?;
                check(
                    in_unit(betas.0) && in_unit(betas.1),
                    "optimizer.betas must both be in [0, 1)",
                )?;
                check(eps >= 0.0, "optimizer.eps must be >= 0")?;
                check(weight_decay >= 0.0, "optimizer.weight_decay must be >= 0")
            }
            OptimizerConfig::Sgd {
                lr,
                momentum,
                dampening,
                weight_decay,
                nesterov,
            } => {
                check(lr >= 0.0, "optimizer.lr must be >= 0")?;
                check(momentum >= 0.0, "optimizer.momentum must be >= 0")?;
                check(weight_decay >= 0.0, "optimizer.weight_decay must be >= 0")?;
                check(
                    !nesterov || (momentum > 0.0 && dampening == 0.0),
                    "optimizer.nesterov needs momentum > 0 and dampening 0",
                )
            }
        }
    }

    /// An optimizer over `params` (name, variable), in a fixed order.
    pub fn build(&self, params: Vec<(String, Var)>) -> Result<Box<dyn Optimizer>> {
        Ok(match *self {
            OptimizerConfig::Adadelta {
                lr,
                rho,
                eps,
                weight_decay,
            } => Box::new(Stateful::new(
                params,
                lr,
                Adadelta {
                    rho,
                    eps,
                    weight_decay,
                },
            )?),
            OptimizerConfig::Adam {
                lr,
                betas,
                eps,
                weight_decay,
            } => Box::new(Stateful::new(
                params,
                lr,
                Adam {
                    betas,
                    eps,
                    weight_decay,
                },
            )?),
            OptimizerConfig::Sgd {
                lr,
                momentum,
                dampening,
                weight_decay,
                nesterov,
            } => Box::new(Stateful::new(
                params,
                lr,
                Sgd {
                    momentum,
                    dampening,
                    weight_decay,
                    nesterov,
                },
            )?),
        })
    }
}
