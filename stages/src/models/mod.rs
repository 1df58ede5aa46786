//! TODO(models)
