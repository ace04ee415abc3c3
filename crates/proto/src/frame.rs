//! The frame: a fixed 32-byte header, a bincode body, then raw data bytes.
//!
//! This module is sans-IO: it turns bytes into headers and frames and back, and checks every
//! length against [`Limits`] before anything is allocated. `docs/protocol.md` is the normative
//! description; the golden-byte tests below pin it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"BRFS";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 12;
/// The size of the fixed header.
pub const HEADER_LEN: usize = 32;

/// Hard limits, checked against the header before any buffer is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest bincode body accepted.
    pub body_max_bytes: u32,
    /// The largest raw data section accepted.
    pub data_max_bytes: u32,
    /// The most requests one connection may have in flight.
    pub inflight_max: usize,
    /// The most connections a server keeps from one address at once; more are refused
    /// (`Busy`) after their `Hello`.
    pub conns_per_peer_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_max_bytes: 1 << 20,
            data_max_bytes: 16 << 20,
            inflight_max: 64,
            conns_per_peer_max: 1024,
        }
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub kind: u16,
    pub request_id: u64,
    pub body_len: u32,
    pub data_len: u32,
    /// crc32c of the data section (0 when there is none).
    pub data_crc32c: u32,
}

/// Why a header or frame was refused. Every variant but `DataChecksum` leaves the stream in an
/// unknown place, so the connection must be closed after it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {found:02x?}, not a brickfs peer")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported protocol version {found} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { found: u16 },
    #[error("header checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("body of {len_bytes} bytes exceeds the limit of {max_bytes}")]
    BodyTooLarge { len_bytes: u32, max_bytes: u32 },
    #[error("data of {len_bytes} bytes exceeds the limit of {max_bytes}")]
    DataTooLarge { len_bytes: u32, max_bytes: u32 },
    #[error("data checksum mismatch for request {request_id}")]
    DataChecksum { request_id: u64 },
}

impl Header {
    /// Writes the 32 header bytes: magic, version, kind, request id, body length, data length,
    /// data crc32c, header crc32c (over the first 28 bytes). Integers are little-endian.
    pub fn encode(&self, out: &mut impl BufMut) {
        let mut raw = [0u8; HEADER_LEN];
        {
            let mut w = &mut raw[..];
            w.put_slice(&MAGIC);
            w.put_u16_le(self.version);
            w.put_u16_le(self.kind);
            w.put_u64_le(self.request_id);
            w.put_u32_le(self.body_len);
            w.put_u32_le(self.data_len);
            w.put_u32_le(self.data_crc32c);
        }
        let crc = crc32c::crc32c(&raw[..HEADER_LEN - 4]);
        raw[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        out.put_slice(&raw);
    }

    /// Decodes and validates a header against `limits`. The kind is not checked here: an
    /// unknown kind with a valid header can be skipped and answered, keeping the connection.
    pub fn decode(raw: &[u8; HEADER_LEN], limits: &Limits) -> Result<Header, FrameError> {
        let mut r = &raw[..];
        let mut magic = [0u8; 4];
        r.copy_to_slice(&mut magic);
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = r.get_u16_le();
        let kind = r.get_u16_le();
        let request_id = r.get_u64_le();
        let body_len = r.get_u32_le();
        let data_len = r.get_u32_le();
        let data_crc32c = r.get_u32_le();
        let stored = r.get_u32_le();
        let computed = crc32c::crc32c(&raw[..HEADER_LEN - 4]);
        if stored != computed {
            return Err(FrameError::HeaderChecksum { stored, computed });
        }
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
        if body_len > limits.body_max_bytes {
            return Err(FrameError::BodyTooLarge {
                len_bytes: body_len,
                max_bytes: limits.body_max_bytes,
            });
        }
        if data_len > limits.data_max_bytes {
            return Err(FrameError::DataTooLarge {
                len_bytes: data_len,
                max_bytes: limits.data_max_bytes,
            });
        }
        Ok(Header {
            version,
            kind,
            request_id,
            body_len,
            data_len,
            data_crc32c,
        })
    }

    /// The bytes that follow the header.
    pub fn payload_len(&self) -> usize {
        self.body_len as usize + self.data_len as usize
    }
}

/// A frame whose body has not been decoded yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawFrame {
    pub header: Header,
    pub body: Bytes,
    pub data: Bytes,
}

/// Incremental, sans-IO frame decoder: feed it bytes, take complete frames out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    limits: Limits,
    buf: BytesMut,
    pending: Option<Header>,
}

impl FrameDecoder {
    pub fn new(limits: Limits) -> FrameDecoder {
        FrameDecoder {
            limits,
            buf: BytesMut::new(),
            pending: None,
        }
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed, or the error that
    /// makes the stream unusable.
    pub fn next_frame(&mut self) -> Result<Option<RawFrame>, FrameError> {
        let header = match self.pending {
            Some(h) => h,
            None => {
                if self.buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                let mut raw = [0u8; HEADER_LEN];
                raw.copy_from_slice(&self.buf[..HEADER_LEN]);
                let h = Header::decode(&raw, &self.limits)?;
                self.buf.advance(HEADER_LEN);
                self.pending = Some(h);
                h
            }
        };
        if self.buf.len() < header.payload_len() {
            return Ok(None);
        }
        self.pending = None;
        let body = self.buf.split_to(header.body_len as usize).freeze();
        let data = self.buf.split_to(header.data_len as usize).freeze();
        if crc32c::crc32c(&data) != header.data_crc32c {
            return Err(FrameError::DataChecksum {
                request_id: header.request_id,
            });
        }
        Ok(Some(RawFrame { header, body, data }))
    }
}

/// Encodes a whole frame into one buffer (used for small frames and tests; the transport
/// writes the data section separately to avoid copying it).
pub fn encode_frame(kind: u16, request_id: u64, body: &[u8], data: &[u8]) -> Vec<u8> {
    let header = Header {
        version: PROTOCOL_VERSION,
        kind,
        request_id,
        body_len: u32::try_from(body.len()).unwrap_or(u32::MAX),
        data_len: u32::try_from(data.len()).unwrap_or(u32::MAX),
        data_crc32c: crc32c::crc32c(data),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + data.len());
    header.encode(&mut out);
    out.extend_from_slice(body);
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Pins the header layout byte for byte: changing it breaks every deployed peer.
    #[test]
    fn header_golden_bytes() {
        let header = Header {
            version: 12,
            kind: 0x0102,
            request_id: 0x1122_3344_5566_7788,
            body_len: 0x10,
            data_len: 0x0010_0000,
            data_crc32c: 0xaabb_ccdd,
        };
        let mut out = Vec::new();
        header.encode(&mut out);
        let expected_prefix: [u8; 28] = [
            b'B', b'R', b'F', b'S', // magic
            0x0c, 0x00, // version (PROTOCOL_VERSION)
            0x02, 0x01, // kind
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // request id
            0x10, 0x00, 0x00, 0x00, // body length
            0x00, 0x00, 0x10, 0x00, // data length
            0xdd, 0xcc, 0xbb, 0xaa, // data crc32c
        ];
        assert_eq!(&out[..28], &expected_prefix);
        let crc = crc32c::crc32c(&expected_prefix).to_le_bytes();
        assert_eq!(&out[28..], &crc);
        let raw: [u8; HEADER_LEN] = out.try_into().unwrap();
        assert_eq!(Header::decode(&raw, &Limits::default()), Ok(header));
        assert_eq!(PROTOCOL_VERSION, 12, "a new version: pin its bytes here");
    }

    #[test]
    fn header_checks_each_field() {
        let limits = Limits::default();
        let good = encode_frame(7, 1, b"abc", b"");
        let mut raw: [u8; HEADER_LEN] = good[..HEADER_LEN].try_into().unwrap();
        assert!(Header::decode(&raw, &limits).is_ok());

        raw[0] = b'X';
        assert!(matches!(
            Header::decode(&raw, &limits),
            Err(FrameError::BadMagic { .. })
        ));

        let mut raw: [u8; HEADER_LEN] = good[..HEADER_LEN].try_into().unwrap();
        raw[9] ^= 1;
        assert!(matches!(
            Header::decode(&raw, &limits),
            Err(FrameError::HeaderChecksum { .. })
        ));

        let too_big = Header {
            version: PROTOCOL_VERSION,
            kind: 7,
            request_id: 1,
            body_len: limits.body_max_bytes + 1,
            data_len: 0,
            data_crc32c: 0,
        };
        let mut out = Vec::new();
        too_big.encode(&mut out);
        let raw: [u8; HEADER_LEN] = out.try_into().unwrap();
        assert!(matches!(
            Header::decode(&raw, &limits),
            Err(FrameError::BodyTooLarge { .. })
        ));

        let wrong_version = Header {
            version: PROTOCOL_VERSION + 1,
            ..too_big
        };
        let mut out = Vec::new();
        wrong_version.encode(&mut out);
        let raw: [u8; HEADER_LEN] = out.try_into().unwrap();
        assert_eq!(
            Header::decode(&raw, &limits),
            Err(FrameError::UnsupportedVersion {
                found: PROTOCOL_VERSION + 1
            })
        );
    }

    #[test]
    fn decoder_reassembles_split_frames() {
        let one = encode_frame(5, 1, b"body-1", b"data-1");
        let two = encode_frame(6, 2, b"", b"");
        let mut all = one.clone();
        all.extend_from_slice(&two);
        for split in 0..all.len() {
            let mut dec = FrameDecoder::new(Limits::default());
            let mut frames = Vec::new();
            dec.extend(&all[..split]);
            while let Some(f) = dec.next_frame().unwrap() {
                frames.push(f);
            }
            dec.extend(&all[split..]);
            while let Some(f) = dec.next_frame().unwrap() {
                frames.push(f);
            }
            assert_eq!(frames.len(), 2, "split at {split}");
            assert_eq!(&frames[0].body[..], b"body-1");
            assert_eq!(&frames[0].data[..], b"data-1");
            assert_eq!(frames[1].header.kind, 6);
        }
    }

    #[test]
    fn decoder_rejects_damaged_data() {
        let mut frame = encode_frame(5, 3, b"b", b"some data");
        let last = frame.len() - 1;
        frame[last] ^= 0x40;
        let mut dec = FrameDecoder::new(Limits::default());
        dec.extend(&frame);
        assert_eq!(
            dec.next_frame(),
            Err(FrameError::DataChecksum { request_id: 3 })
        );
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder: they are a frame, a need for more bytes, or
        /// an error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut dec = FrameDecoder::new(Limits::default());
            dec.extend(&bytes);
            for _ in 0..8 {
                match dec.next_frame() {
                    Ok(Some(frame)) => {
                        let _ = crate::msg::Message::decode(frame.header.kind, &frame.body);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }

        /// A valid header followed by arbitrary body bytes decodes to an error or a message,
        /// never a panic.
        #[test]
        fn arbitrary_bodies_never_panic(kind in 0u16..64, body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::msg::Message::decode(kind, &body);
        }
    }
}
