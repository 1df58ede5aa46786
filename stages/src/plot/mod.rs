//! TODO(plot)
