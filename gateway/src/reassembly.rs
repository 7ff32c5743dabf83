//! Reassembles fragmented WebSocket messages under one cap on the whole message.
//!
//! fastwebsockets' `max_message_size` bounds each frame, and its `FragmentCollectorRead`
//! appends continuation frames without a limit: a client could build a message of any size
//! out of small fragments. Here the cap applies to the message being assembled.

use fastwebsockets::{Frame, OpCode, Payload};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReassemblyError {
    #[error("message over {0} bytes")]
    TooBig(usize),
    #[error("text message is not UTF-8")]
    InvalidUtf8,
    #[error("fragment out of sequence")]
    Protocol,
}

impl ReassemblyError {
    /// The close code the connection ends with.
    pub fn close_code(&self) -> u16 {
        use proto::errors::close;
        match self {
            Self::TooBig(_) => close::TOO_BIG,
            Self::InvalidUtf8 => close::INVALID_UTF8,
            Self::Protocol => close::PROTOCOL,
        }
    }
}

pub struct Reassembly {
    max: usize,
    /// The opcode and bytes of the message being assembled.
    partial: Option<(OpCode, Vec<u8>)>,
}

impl Reassembly {
    pub fn new(max: usize) -> Self {
        Self { max, partial: None }
    }

    /// Takes one frame; returns a whole message (or a control frame) when there is one.
    pub fn push<'f>(&mut self, frame: Frame<'f>) -> Result<Option<Frame<'f>>, ReassemblyError> {
        let message = match (frame.opcode, self.partial.take()) {
            (OpCode::Text | OpCode::Binary, None) if frame.fin => frame,
            (OpCode::Text | OpCode::Binary, None) => {
                self.partial = Some((frame.opcode, frame.payload.to_vec()));
                return Ok(None);
            }
            (OpCode::Text | OpCode::Binary, Some(_)) | (OpCode::Continuation, None) => {
                return Err(ReassemblyError::Protocol)
            }
            (OpCode::Continuation, Some((opcode, mut buf))) => {
                if buf.len() + frame.payload.len() > self.max {
                    return Err(ReassemblyError::TooBig(self.max));
                }
                buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    self.partial = Some((opcode, buf));
                    return Ok(None);
                }
                Frame::new(true, opcode, None, Payload::Owned(buf))
            }
            // Close, ping and pong may come between fragments.
            (_, partial) => {
                self.partial = partial;
                return Ok(Some(frame));
            }
        };
        // fastwebsockets checks single text frames; assembled ones are checked here.
        if message.opcode == OpCode::Text && std::str::from_utf8(&message.payload).is_err() {
            return Err(ReassemblyError::InvalidUtf8);
        }
        Ok(Some(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Frame<'static> {
        Frame::new(fin, opcode, None, Payload::Owned(payload.to_vec()))
    }

    fn err(r: Result<Option<Frame<'_>>, ReassemblyError>) -> ReassemblyError {
        match r {
            Err(e) => e,
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn fragments_join_into_one_message() {
        let mut r = Reassembly::new(16);
        assert!(r.push(frame(false, OpCode::Text, b"ab")).unwrap().is_none());
        // a ping between fragments passes through
        let ping = r.push(frame(true, OpCode::Ping, b"")).unwrap().unwrap();
        assert_eq!(ping.opcode, OpCode::Ping);
        assert!(r
            .push(frame(false, OpCode::Continuation, b"cd"))
            .unwrap()
            .is_none());
        let m = r
            .push(frame(true, OpCode::Continuation, b"e"))
            .unwrap()
            .unwrap();
        assert_eq!((m.opcode, &m.payload[..]), (OpCode::Text, &b"abcde"[..]));
    }

    #[test]
    fn the_cap_applies_to_the_whole_message() {
        let mut r = Reassembly::new(8);
        r.push(frame(false, OpCode::Binary, b"1234")).unwrap();
        r.push(frame(false, OpCode::Continuation, b"5678")).unwrap();
        assert_eq!(
            err(r.push(frame(true, OpCode::Continuation, b"9"))),
            ReassemblyError::TooBig(8)
        );
    }

    #[test]
    fn out_of_sequence_fragments_are_protocol_errors() {
        let mut r = Reassembly::new(8);
        assert_eq!(
            err(r.push(frame(true, OpCode::Continuation, b"x"))),
            ReassemblyError::Protocol
        );
        r.push(frame(false, OpCode::Text, b"a")).unwrap();
        assert_eq!(
            err(r.push(frame(true, OpCode::Text, b"b"))),
            ReassemblyError::Protocol
        );
    }

    #[test]
    fn utf8_is_checked_across_fragments() {
        let mut r = Reassembly::new(16);
        r.push(frame(false, OpCode::Text, b"\xc3")).unwrap();
        assert_eq!(
            err(r.push(frame(true, OpCode::Continuation, b"\x28"))),
            ReassemblyError::InvalidUtf8
        );
        // a character split across fragments is fine
        r.push(frame(false, OpCode::Text, b"\xc3")).unwrap();
        let m = r
            .push(frame(true, OpCode::Continuation, b"\xa9"))
            .unwrap()
            .unwrap();
        assert_eq!(&m.payload[..], "é".as_bytes());
    }
}
