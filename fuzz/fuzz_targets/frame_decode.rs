//! `FrameDecoder::split` fed an arbitrary byte stream in arbitrary chunks.
//!
//! Input layout: 4 bytes max_frame_bytes (u32 BE), 1 byte largest chunk (0 = the rest at
//! once), 2 bytes chunking seed, then the stream.
//!
//! Checked: no panic; every frame is 4..=max_frame_bytes bytes; the frames and the final state
//! (waiting for bytes, or the error) equal those of a plain reference splitter run over the
//! whole stream; the buffer never holds much more memory than the bytes received (a length
//! prefix alone must not make it allocate); "need more bytes" leaves spare capacity.
#![no_main]

use bytes::{BufMut, Bytes, BytesMut};
use leaderlink::kafka::{error::ConnError, frame::FrameDecoder};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Waiting for more bytes; the unconsumed tail.
    NeedMore(Vec<u8>),
    BadLength(i32),
    TooLarge(usize),
}

/// The reference: the same rules, on the whole stream at once.
fn reference(stream: &[u8], max: usize) -> (Vec<&[u8]>, End) {
    let mut frames = Vec::new();
    let mut rest = stream;
    loop {
        if rest.len() < 4 {
            return (frames, End::NeedMore(rest.to_vec()));
        }
        let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if len < 4 {
            return (frames, End::BadLength(len));
        }
        let len = len as usize;
        if len > max {
            return (frames, End::TooLarge(len));
        }
        if rest.len() < 4 + len {
            return (frames, End::NeedMore(rest.to_vec()));
        }
        frames.push(&rest[4..4 + len]);
        rest = &rest[4 + len..];
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 7 {
        return;
    }
    let max = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let max_chunk = usize::from(data[4]);
    let mut seed = u16::from_be_bytes([data[5], data[6]]) as u32 | 1;
    let stream = &data[7..];

    let decoder = FrameDecoder::new(max);
    let mut buf = BytesMut::new();
    let mut got: Vec<Bytes> = Vec::new();
    let mut end = None;
    let mut fed = 0;
    'feed: while fed < stream.len() {
        let n = if max_chunk == 0 {
            stream.len() - fed
        } else {
            // xorshift32: chunk sizes 1..=max_chunk.
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            1 + (seed as usize % max_chunk)
        }
        .min(stream.len() - fed);
        buf.put_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            let r = decoder.split(&mut buf);
            // Memory follows the bytes received, never what a length prefix claims.
            assert!(
                buf.capacity() <= 2 * fed + 512 * 1024,
                "capacity {} after {fed} bytes received",
                buf.capacity()
            );
            match r {
                Ok(Some(frame)) => {
                    assert!(frame.len() >= 4, "frame of {} bytes", frame.len());
                    assert!(frame.len() <= max, "frame of {} bytes > {max}", frame.len());
                    got.push(frame);
                }
                Ok(None) => {
                    assert!(
                        buf.capacity() > buf.len(),
                        "no room reserved for more bytes"
                    );
                    break;
                }
                Err(ConnError::BadLength(l)) => {
                    end = Some(End::BadLength(l));
                    break 'feed;
                }
                Err(ConnError::FrameTooLarge { limit, actual }) => {
                    assert_eq!(limit, max);
                    end = Some(End::TooLarge(actual));
                    break 'feed;
                }
                Err(e) => panic!("unexpected error {e:?}"),
            }
        }
    }
    // An error poisons the connection: the reference must fail at the same frame, which it
    // only can once every byte up to that prefix was fed, so feeding the rest changes nothing.
    let end = end.unwrap_or_else(|| End::NeedMore(buf.to_vec()));
    let (want, want_end) = reference(stream, max);
    assert_eq!(got.len(), want.len(), "frame count");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(&g[..], *w);
    }
    assert_eq!(end, want_end);
});
