//! Server frames as they go on the wire. Server frames are never masked, so encoding one is
//! a head from fastwebsockets' own head encoder ([`Frame::fmt_head`]) and a copy of the
//! payload, appended to whatever buffer the next write sends.

use fastwebsockets::Frame;

/// The longest frame head: 2 bytes, a 64-bit length, and a mask (never set by a server).
pub const MAX_HEAD: usize = 14;

/// Appends one frame, as it goes on the wire, to `buf`.
pub fn encode(buf: &mut Vec<u8>, mut frame: Frame<'_>) {
    let mut head = [0u8; MAX_HEAD];
    let n = frame.fmt_head(&mut head);
    buf.extend_from_slice(&head[..n]);
    buf.extend_from_slice(&frame.payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::Payload;

    /// RFC 6455 §5.2 by hand: FIN + opcode, then a 7-bit, 16-bit or 64-bit length, no mask.
    fn expected(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => v.push(n as u8),
            n if n < 65536 => {
                v.push(126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn frames_are_encoded_as_the_rfc_says_at_every_length_boundary() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload = vec![b'x'; len];
            let mut buf = Vec::new();
            encode(&mut buf, Frame::text(Payload::Borrowed(&payload)));
            assert_eq!(buf, expected(0x1, &payload), "text of {len} bytes");
        }
        let mut buf = Vec::new();
        encode(&mut buf, Frame::pong(Payload::Borrowed(b"p")));
        encode(&mut buf, Frame::close(1013, b"client too slow"));
        let mut want = expected(0xA, b"p");
        want.extend(expected(0x8, b"\x03\xf5client too slow"));
        assert_eq!(buf, want, "frames appended back to back");
    }
}
