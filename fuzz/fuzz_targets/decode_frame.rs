//! Feeds arbitrary bytes to the frame decoder and every complete frame's body to the message
//! decoder. Any panic is a bug: bad input must become an error (invariant 5).
//!
//! Run: `cargo +nightly fuzz run decode_frame` from the repository root (needs cargo-fuzz).

#![no_main]

use brickfs_proto::frame::{FrameDecoder, Limits};
use brickfs_proto::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = FrameDecoder::new(Limits::default());
    // Feed in two pieces to exercise reassembly.
    let split = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    decoder.extend(&data[..split]);
    let _ = decoder.next_frame();
    decoder.extend(&data[split..]);
    while let Ok(Some(frame)) = decoder.next_frame() {
        if let Ok(msg) = Message::decode(frame.header.kind, &frame.body) {
            // Whatever decodes must encode back to a body that decodes the same.
            let again = Message::decode(msg.kind(), &msg.encode_body()).expect("re-decode");
            assert_eq!(again, msg);
        }
    }
});
