//! TODO(download)
