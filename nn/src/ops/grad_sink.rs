//! Parameter gradients handed straight to the training step, past candle's backward pass.
//! candle 0.9 adds every gradient it receives into a fresh zero tensor (a fill and an add,
//! single-threaded, for each parameter every step: about 10 ms of a 2-thread ResNet-18 step,
//! 45 MB of weights; upstream candle PRs #3578 and #3822 are open on it). While a step has the
//! sink armed ([`backward`]), the fast ops deliver the gradients of their trainable arguments
//! (candle `Var`s) here instead, and the step puts them into the gradient store, so the
//! optimizer sees the same store, with the same values, either way.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId};
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    // candle's backward pass runs the ops' backward on the thread that called it, so each
    // training thread has its own sink.
    static SINK: RefCell<Option<HashMap<TensorId, Tensor>>> = const { RefCell::new(None) };
}

/// `loss.backward()` with the sink armed: candle's gradient store with the gradients the fast
/// ops delivered to the sink put in, added to candle's own where a variable has both (one also
/// used by a candle op).
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    let (mut grads, delivered) = collect(|| loss.backward())?;
    for (id, grad) in delivered {
        let total = match grads.get_id(id) {
            Some(from_candle) => from_candle.add(&grad)?,
            None => grad,
        };
        grads.insert_id(id, total);
    }
    Ok(grads)
}

/// Runs `backward` with the sink armed; returns its result and the gradients the ops delivered
/// to the sink.
fn collect<R>(backward: impl FnOnce() -> Result<R>) -> Result<(R, Vec<(TensorId, Tensor)>)> {
    /// Disarms the sink however `backward` ends, a panic included: an armed sink left behind
    /// would swallow the gradients of later backward passes on this thread.
    struct Disarm;
    impl Drop for Disarm {
        fn drop(&mut self) {
            SINK.with(|s| s.borrow_mut().take());
        }
    }
    SINK.with(|s| *s.borrow_mut() = Some(HashMap::new()));
    let _disarm = Disarm;
    let result = backward();
    let sunk = SINK.with(|s| s.borrow_mut().take()).unwrap_or_default();
    Ok((result?, sunk.into_iter().collect()))
}

/// The gradient an op returns to candle for `arg`: `grad` itself, or, while a sink is armed
/// and `arg` is a trainable variable, None after adding `grad` to the sink.
pub(super) fn route(arg: &Tensor, grad: Option<Tensor>) -> Result<Option<Tensor>> {
    let Some(grad) = grad else {
        return Ok(None);
    };
    if !arg.is_variable() {
        return Ok(Some(grad));
    }
    SINK.with(|s| {
        let mut sink = s.borrow_mut();
        let Some(sink) = sink.as_mut() else {
            return Ok(Some(grad));
        };
        // A parameter used twice in one pass (none of ours is) gets its gradients summed.
        let total = match sink.remove(&arg.id()) {
            Some(previous) => (previous + grad)?,
            None => grad,
        };
        sink.insert(arg.id(), total);
        Ok(None)
    })
}

/// [`route`] for the three arguments of a custom op.
pub(super) fn route3(
    args: [&Tensor; 3],
    grads: (Option<Tensor>, Option<Tensor>, Option<Tensor>),
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    Ok((
        route(args[0], grads.0)?,
        route(args[1], grads.1)?,
        route(args[2], grads.2)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;
    use candle_core::{Device, Var};

    /// The gradients a step gets through the sink are the ones candle's backward pass gives
    /// without it, bit for bit, for every variable argument of every fast op with parameters
    /// (the input here is a variable too), and they did go through the sink. A weight also used
    /// by a candle op (a penalty on it) gets both shares.
    #[test]
    fn the_sink_delivers_what_candle_would() -> Result<()> {
        let dev = Device::Cpu;
        let var = |dims: &[usize], seed: f32| -> Result<Var> {
            let n: usize = dims.iter().product();
            let data: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
            Var::from_tensor(&Tensor::from_vec(data, dims, &dev)?)
        };
        let x = var(&[4, 3, 6, 6], 0.1)?;
        let w = var(&[5, 3, 3, 3], 0.2)?;
        let b = var(&[5], 0.3)?;
        let gamma = var(&[5], 0.4)?;
        let beta = var(&[5], 0.5)?;
        let fc_w = var(&[7, 5 * 36], 0.6)?;
        let fc_b = var(&[7], 0.7)?;
        let loss = || -> Result<Tensor> {
            let h = ops::conv2d(&x, &w, Some(&b), 1, 1)?;
            let (h, _, _) = ops::batch_norm_train(&h, &gamma, &beta, 1e-5, true)?;
            let y = ops::linear(&h.flatten_from(1)?, &fc_w, &fc_b, false)?;
            y.sqr()?.sum_all()? + w.sqr()?.sum_all()?
        };
        let plain = loss()?.backward()?;
        let (_, delivered) = collect(|| loss()?.backward())?;
        let params = [&x, &w, &b, &gamma, &beta, &fc_w, &fc_b];
        assert_eq!(
            delivered.len(),
            params.len(),
            "every variable through the sink"
        );
        let routed = backward(&loss()?)?;
        for (i, v) in params.iter().enumerate() {
            let (Some(a), Some(b)) = (plain.get(v), routed.get(v)) else {
                panic!("argument {i}: missing gradient");
            };
            let (a, b) = (
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?,
            );
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "argument {i}: gradients differ"
            );
        }
        // Disarmed after the step: the ops hand gradients to candle again.
        let again = loss()?.backward()?;
        assert!(again.get(&w).is_some());
        // And after a step that panicked halfway.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            collect(|| -> Result<()> { panic!("a backward pass that fails") })
        }));
        assert!(panicked.is_err());
        let after_panic = loss()?.backward()?;
        assert!(after_panic.get(&w).is_some(), "the sink stayed armed");
        Ok(())
    }
}
