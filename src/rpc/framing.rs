//! Framing: cuts `\n`-terminated request lines out of a connection's byte stream, in bounded
//! memory whatever the client sends (the fuzz target `framer` drives it).

use bytes::{Buf, BytesMut};

/// A frame cut from the input stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, without its `\n` (and `\r`).
    Line(BytesMut),
    /// A line longer than the limit; its bytes were dropped.
    TooLong,
}

/// Cuts `\n`-terminated lines out of a byte stream, holding at most `max` bytes of an unfinished
/// line: past that the line is reported as too long once and the rest of it is discarded as it
/// arrives, so memory stays bounded whatever the client sends.
#[derive(Debug)]
pub struct LineBuffer {
    buf: BytesMut,
    max: usize,
    /// Inside an over-long line: drop bytes up to the next `\n`.
    discarding: bool,
    /// Bytes of `buf` already searched for `\n`.
    scanned: usize,
}

/// Bytes reserved for each read.
const READ_CHUNK: usize = 16 * 1024;

impl LineBuffer {
    pub fn new(max: usize) -> Self {
        LineBuffer {
            buf: BytesMut::with_capacity(READ_CHUNK),
            max,
            discarding: false,
            scanned: 0,
        }
    }

    /// Space to read into.
    pub fn spare(&mut self) -> &mut BytesMut {
        self.buf.reserve(READ_CHUNK);
        &mut self.buf
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next frame, if one is complete.
    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            let newline = self.buf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| self.scanned + i);
            if self.discarding {
                match newline {
                    Some(at) => {
                        self.buf.advance(at + 1);
                        self.scanned = 0;
                        self.discarding = false;
                        continue;
                    }
                    None => {
                        self.buf.clear();
                        self.scanned = 0;
                        return None;
                    }
                }
            }
            return match newline {
                Some(at) if at > self.max => {
                    self.buf.advance(at + 1);
                    self.scanned = 0;
                    Some(Frame::TooLong)
                }
                Some(at) => {
                    let mut line = self.buf.split_to(at + 1);
                    line.truncate(at);
                    if line.last() == Some(&b'\r') {
                        line.truncate(at - 1);
                    }
                    self.scanned = 0;
                    Some(Frame::Line(line))
                }
                None if self.buf.len() > self.max => {
                    self.buf.clear();
                    self.scanned = 0;
                    self.discarding = true;
                    Some(Frame::TooLong)
                }
                None => {
                    self.scanned = self.buf.len();
                    None
                }
            };
        }
    }

    /// At end of input: an unterminated last line is still a line.
    pub fn finish(&mut self) -> Option<Frame> {
        if self.discarding || self.buf.is_empty() {
            return None;
        }
        self.scanned = 0;
        Some(Frame::Line(self.buf.split()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &mut LineBuffer, bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for chunk in bytes.chunks(7000) {
            lines.spare().extend_from_slice(chunk);
            while let Some(frame) = lines.next_frame() {
                frames.push(frame);
            }
        }
        frames
    }

    fn line(text: &str) -> Frame {
        Frame::Line(BytesMut::from(text))
    }

    #[test]
    fn cuts_lines_and_strips_cr() {
        let mut lines = LineBuffer::new(100);
        assert_eq!(
            feed(&mut lines, b"a\r\nbc\n\nd"),
            vec![line("a"), line("bc"), line("")]
        );
        assert_eq!(lines.finish(), Some(line("d")));
        assert_eq!(lines.finish(), None);
    }

    #[test]
    fn overlong_line_is_reported_once_and_the_stream_recovers() {
        let mut lines = LineBuffer::new(64);
        let mut input = vec![b'x'; 10 * 1024 * 1024];
        input.push(b'\n');
        input.extend_from_slice(b"ok\n");
        let mut frames = Vec::new();
        for chunk in input.chunks(READ_CHUNK) {
            lines.spare().extend_from_slice(chunk);
            while let Some(frame) = lines.next_frame() {
                frames.push(frame);
            }
            assert!(
                lines.buffered() <= 64 + READ_CHUNK,
                "buffer grew to {}",
                lines.buffered()
            );
        }
        assert_eq!(frames, vec![Frame::TooLong, line("ok")]);
    }

    #[test]
    fn overlong_line_inside_one_read_is_dropped() {
        let mut lines = LineBuffer::new(4);
        assert_eq!(
            feed(&mut lines, b"123456\nabcd\n"),
            vec![Frame::TooLong, line("abcd")]
        );
    }

    #[test]
    fn unterminated_overlong_tail_is_not_a_line() {
        let mut lines = LineBuffer::new(4);
        assert_eq!(feed(&mut lines, b"123456"), vec![Frame::TooLong]);
        assert_eq!(lines.finish(), None);
    }
}
