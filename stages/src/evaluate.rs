//! TODO(evaluate)
