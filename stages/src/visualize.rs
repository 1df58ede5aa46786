//! TODO(visualize)
