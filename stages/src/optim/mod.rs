//! TODO(optim)
