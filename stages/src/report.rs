//! TODO(report)
