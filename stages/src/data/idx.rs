//! The IDX format (the original MNIST/Fashion-MNIST container): a magic number naming the
//! element type and rank, big-endian dimension sizes, then the raw elements. Only unsigned
//! bytes (type 0x08) occur in Fashion-MNIST, so only those are accepted.

use std::path::Path;

/// A parsed IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// What is wrong with an IDX file.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not an IDX file: {reason}")]
    Malformed { file: String, reason: String },
}

const UBYTE: u8 = 0x08;

impl IdxArray {
    /// Parses IDX bytes; `name` is used in error messages only.
    pub fn parse(bytes: &[u8], name: &str) -> Result<Self, IdxError> {
        let bad = |reason: String| IdxError::Malformed {
            file: name.to_string(),
            reason,
        };
        if bytes.len() < 4 {
            return Err(bad(format!(
                "{} bytes is shorter than the 4-byte header",
                bytes.len()
            )));
        }
        if bytes[0] != 0 || bytes[1] != 0 {
            return Err(bad(format!(
                "magic number starts with {:#04x} {:#04x}, expected 0x00 0x00 (is it still gzip-compressed?)",
                bytes[0], bytes[1]
            )));
        }
        if bytes[2] != UBYTE {
            return Err(bad(format!(
                "element type {:#04x} is not unsigned byte (0x08)",
                bytes[2]
            )));
        }
        let rank = bytes[3] as usize;
        if rank == 0 {
            return Err(bad("rank 0: no dimensions".into()));
        }
        let header = 4 + 4 * rank;
        if bytes.len() < header {
            return Err(bad(format!(
                "truncated header: rank {rank} needs {header} bytes, file has {}",
                bytes.len()
            )));
        }
        let dims: Vec<usize> = (0..rank)
            .map(|i| {
                let b = &bytes[4 + 4 * i..8 + 4 * i];
                u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
            })
            .collect();
        let count = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
        let body = bytes.len() - header;
        if body != count {
            return Err(bad(format!(
                "dimensions {dims:?} need {count} data bytes, file has {body}{}",
                if body < count { " (truncated)" } else { "" }
            )));
        }
        Ok(IdxArray {
            dims,
            data: bytes[header..].to_vec(),
        })
    }

    /// Reads and parses an IDX file (uncompressed, or gzip when the name ends in .gz).
    pub fn read(path: &Path) -> Result<Self, IdxError> {
        let file = path.display().to_string();
        let io = |source| IdxError::Io {
            file: file.clone(),
            source,
        };
        let raw = std::fs::read(path).map_err(io)?;
        let bytes = if path.extension().is_some_and(|e| e == "gz") {
            let mut out = Vec::with_capacity(raw.len() * 4);
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut out)
                .map_err(io)?;
            out
        } else {
            raw
        };
        Self::parse(&bytes, &file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(dims: &[u32]) -> Vec<u8> {
        let mut v = vec![0, 0, UBYTE, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn parses_a_well_formed_array() {
        let mut b = header(&[2, 3]);
        b.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        let a = IdxArray::parse(&b, "x").unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn rejects_truncated_body_naming_the_file() {
        let mut b = header(&[2, 3]);
        b.extend_from_slice(&[1, 2]);
        let e = IdxArray::parse(&b, "train-images").unwrap_err().to_string();
        assert!(e.contains("train-images") && e.contains("truncated"), "{e}");
    }

    #[test]
    fn rejects_gzip_bytes() {
        let e = IdxArray::parse(&[0x1f, 0x8b, 8, 0], "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gzip"), "{e}");
    }
}
