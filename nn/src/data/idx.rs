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
        let dims = Self::parse_header(bytes, bytes.len() as u64, name)?;
        let header = 4 + 4 * dims.len();
        Self::element_count_in(&dims, header as u64, bytes.len() as u64, name)?;
        Ok(IdxArray {
            dims,
            data: bytes[header..].to_vec(),
        })
    }

    /// Reads and parses an IDX file (uncompressed, or gzip when it starts with the gzip
    /// magic bytes, whatever its name). A plain file is read straight into the result
    /// without an intermediate copy: loading the 47 MB training images is one `read`.
    pub fn read(path: &Path) -> Result<Self, IdxError> {
        use std::io::Read;
        let file = path.display().to_string();
        let io = |source| IdxError::Io {
            file: file.clone(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        let mut magic = [0u8; 2];
        let got = read_up_to(&mut f, &mut magic).map_err(io)?;
        if got == 2 && magic == [0x1f, 0x8b] {
            let mut raw = Vec::with_capacity(len as usize);
            raw.extend_from_slice(&magic);
            f.read_to_end(&mut raw).map_err(io)?;
            return Self::parse_gzip(&raw, &file);
        }
        // Plain: read the header, check it against the file length, then read the body
        // into a buffer of exactly the right size.
        let mut header = magic[..got].to_vec();
        header.resize(4, 0);
        let in_header = read_up_to(&mut f, &mut header[got..]).map_err(io)? + got;
        header.truncate(in_header);
        let dims = Self::parse_header(&header, len, &file)?;
        let rank = dims.len();
        let mut dim_bytes = vec![0u8; 4 * rank];
        f.read_exact(&mut dim_bytes).map_err(io)?;
        header.extend_from_slice(&dim_bytes);
        let dims = Self::parse_header(&header, len, &file)?;
        let count = Self::element_count_in(&dims, header.len() as u64, len, &file)?;
        let mut data = vec![0u8; count];
        f.read_exact(&mut data).map_err(io)?;
        Ok(IdxArray { dims, data })
    }

    /// Decompresses and parses gzip-compressed IDX bytes. The decompressed size is unknown up
    /// front, so the header is decoded first and at most the elements it announces are
    /// decompressed into memory (a corrupt or hostile file cannot make this allocate more
    /// than its data really holds, nor more than it announces).
    fn parse_gzip(raw: &[u8], name: &str) -> Result<Self, IdxError> {
        use std::io::Read;
        let corrupt = |e: std::io::Error| IdxError::Malformed {
            file: name.to_string(),
            reason: format!("corrupt gzip data: {e}"),
        };
        let mut decoder = flate2::read::MultiGzDecoder::new(raw);
        let mut header = vec![0u8; 4];
        let got = read_up_to(&mut decoder, &mut header).map_err(corrupt)?;
        header.truncate(got);
        // The decompressed length is not known yet: only check the 4-byte prefix.
        let rank = Self::parse_header(&header, u64::MAX, name)?.len();
        header.resize(4 + 4 * rank, 0);
        let got = read_up_to(&mut decoder, &mut header[4..]).map_err(corrupt)? + 4;
        header.truncate(got);
        let dims = Self::parse_header(&header, got as u64, name)?;
        let count = Self::element_count(&dims, name)?;
        // DEFLATE expands at most ~1032:1, so more than that is never needed up front.
        let mut data = Vec::with_capacity(count.min(raw.len().saturating_mul(1032)));
        (&mut decoder)
            .take(count as u64 + 1)
            .read_to_end(&mut data)
            .map_err(corrupt)?;
        let mut body = data.len() as u64;
        if body > count as u64 {
            // Too long: count the rest (without keeping it) for the message.
            body += std::io::copy(&mut decoder, &mut std::io::sink()).map_err(corrupt)?;
        }
        Self::check_body(&dims, count, body, name)?;
        Ok(IdxArray { dims, data })
    }

    /// Parses IDX bytes already in memory, reusing the buffer for the elements.
    pub fn parse_owned(mut bytes: Vec<u8>, name: &str) -> Result<Self, IdxError> {
        let dims = Self::parse_header(&bytes, bytes.len() as u64, name)?;
        let header = 4 + 4 * dims.len();
        Self::element_count_in(&dims, header as u64, bytes.len() as u64, name)?;
        bytes.drain(..header);
        Ok(IdxArray { dims, data: bytes })
    }

    /// Checks magic and element type; returns the dimensions when the header is complete
    /// in `bytes` (an empty Vec when only the 4-byte prefix is there and `rank` > 0).
    fn parse_header(bytes: &[u8], file_len: u64, name: &str) -> Result<Vec<usize>, IdxError> {
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
        if file_len < header as u64 {
            return Err(bad(format!(
                "truncated header: rank {rank} needs {header} bytes, file has {file_len}"
            )));
        }
        if bytes.len() < header {
            return Ok(vec![0; rank]);
        }
        Ok((0..rank)
            .map(|i| {
                let b = &bytes[4 + 4 * i..8 + 4 * i];
                u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
            })
            .collect())
    }

    /// The number of elements `dims` announce, checked against the bytes after the header.
    fn element_count_in(
        dims: &[usize],
        header_len: u64,
        file_len: u64,
        name: &str,
    ) -> Result<usize, IdxError> {
        let count = Self::element_count(dims, name)?;
        Self::check_body(dims, count, file_len.saturating_sub(header_len), name)?;
        Ok(count)
    }

    /// The number of elements `dims` announce (an error when the product overflows).
    fn element_count(dims: &[usize], name: &str) -> Result<usize, IdxError> {
        dims.iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| IdxError::Malformed {
                file: name.to_string(),
                reason: format!("dimensions {dims:?} overflow"),
            })
    }

    /// Checks that the `body` bytes after the header hold exactly `count` elements.
    fn check_body(dims: &[usize], count: usize, body: u64, name: &str) -> Result<(), IdxError> {
        if body == count as u64 {
            return Ok(());
        }
        Err(IdxError::Malformed {
            file: name.to_string(),
            reason: format!(
                "dimensions {dims:?} need {count} data bytes, file has {body}{}",
                if body < count as u64 {
                    " (truncated)"
                } else {
                    ""
                }
            ),
        })
    }
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn read_up_to(reader: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
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
