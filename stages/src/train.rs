//! TODO(train)
