//! TODO(ops)
