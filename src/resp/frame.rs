//! RESP on the wire, the server's side: client requests read as Redis itself reads them (a
//! multibulk `*N` of `$len` bulk strings, or an inline line of words), and replies written in
//! RESP2 or RESP3. No I/O here.
//!
//! A request is the one RESP shape a server takes: Redis refuses nested arrays, maps and every
//! other frame type in a request ("Protocol error: expected '$', got '*'"), and so does this
//! reader, which is why it is not a general RESP decoder. It consumes each element as soon as it
//! is complete (never rescanning what it read), and bounds everything by `max` bytes: a declared
//! length past it is refused before a byte of it is buffered.

use bytes::{Buf, Bytes, BytesMut};

/// A request that breaks the protocol: the connection is answered `-ERR Protocol error: …` and
/// closed, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// Reads requests out of the bytes a connection received.
pub struct Requests {
    buffer: BytesMut,
    /// The request being read, when its header was: its arguments so far and how many more.
    partial: Option<Partial>,
    max: usize,
    /// An emptied argument list handed back ([`Requests::recycle`]), to hold the next request's.
    spare: Vec<Bytes>,
    /// How many bytes the buffer must hold for the bulk string being read to be whole (0: none
    /// waited for): the room the next reads go to is made for it at once, not grown per read.
    awaited: usize,
}

struct Partial {
    args: Vec<Bytes>,
    missing: usize,
    /// Bytes of this request consumed so far.
    size: usize,
}

/// At most this many arguments are reserved up front, whatever a header declares.
const RESERVE: usize = 64;

impl Requests {
    /// A reader that refuses any request longer than `max` bytes.
    pub fn new(max: usize) -> Requests {
        Requests {
            buffer: BytesMut::with_capacity(16 * 1024),
            partial: None,
            max,
            spare: Vec::new(),
            awaited: 0,
        }
    }

    /// Where the next bytes read go.
    pub fn spare(&mut self) -> &mut BytesMut {
        let free = self.buffer.capacity() - self.buffer.len();
        let missing = self.awaited.saturating_sub(self.buffer.len());
        if free < 4096 || free < missing {
            self.buffer.reserve(missing.max(16 * 1024));
        }
        &mut self.buffer
    }

    /// Bytes received and not yet part of a request handed out.
    pub fn buffered(&self) -> usize {
        self.buffer.len() + self.partial.as_ref().map_or(0, |p| p.size)
    }

    /// The next complete request (its arguments, and its size in bytes); `Ok(None)` until one is
    /// complete. An empty inline line is skipped, as Redis skips it.
    pub fn next_request(&mut self) -> Result<Option<(Vec<Bytes>, usize)>, ProtocolError> {
        loop {
            if self.partial.is_none() {
                match self.buffer.first() {
                    None => return Ok(None),
                    Some(b'*') => match self.header(b'*')? {
                        None => return Ok(None),
                        // `*0` and `*-1`: nothing to do, as Redis does nothing.
                        Some((n, _)) if n <= 0 => continue,
                        Some((n, size)) => {
                            let n = n as usize;
                            // Each argument takes at least `$0\r\n\r\n`.
                            if n > self.max / 6 + 1 {
                                return Err(ProtocolError("invalid multibulk length".into()));
                            }
                            let mut args = std::mem::take(&mut self.spare);
                            args.reserve(n.min(RESERVE));
                            self.partial = Some(Partial {
                                args,
                                missing: n,
                                size,
                            });
                        }
                    },
                    Some(_) => match self.inline()? {
                        None => return Ok(None),
                        Some((args, _)) if args.is_empty() => continue,
                        Some(done) => return Ok(Some(done)),
                    },
                }
            }
            let partial = self.partial.as_mut().expect("set above");
            while partial.missing > 0 {
                let Some(&first) = self.buffer.first() else {
                    return Ok(None);
                };
                if first != b'$' {
                    return Err(ProtocolError(format!(
                        "expected '$', got '{}'",
                        shown_byte(first)
                    )));
                }
                let Some(end) = find_crlf(&self.buffer, self.max) else {
                    return match self.buffer.len() > 32 {
                        true => Err(ProtocolError("invalid bulk length".into())),
                        false => Ok(None),
                    };
                };
                let len = parse_int(&self.buffer[1..end])
                    .filter(|&n| n >= 0 && (n as usize) <= self.max)
                    .ok_or_else(|| ProtocolError("invalid bulk length".into()))?
                    as usize;
                let size = end + 2 + len + 2;
                if partial.size + size > self.max {
                    return Err(ProtocolError(format!(
                        "request longer than {} bytes (socket.max_request_bytes)",
                        self.max
                    )));
                }
                if self.buffer.len() < size {
                    self.awaited = size;
                    return Ok(None);
                }
                self.awaited = 0;
                if &self.buffer[size - 2..size] != b"\r\n" {
                    return Err(ProtocolError("bulk string not followed by CRLF".into()));
                }
                self.buffer.advance(end + 2);
                let arg = self.buffer.split_to(len).freeze();
                self.buffer.advance(2);
                partial.args.push(arg);
                partial.size += size;
                partial.missing -= 1;
            }
            let done = self.partial.take().expect("read above");
            return Ok(Some((done.args, done.size)));
        }
    }

    /// Takes back a request's argument list once it is handled: the next request reuses it.
    pub fn recycle(&mut self, mut args: Vec<Bytes>) {
        if args.capacity() <= RESERVE {
            args.clear();
            self.spare = args;
        }
    }

    /// A `*N\r\n` header, consumed: N and its size; `None` until its CRLF arrived.
    fn header(&mut self, kind: u8) -> Result<Option<(i64, usize)>, ProtocolError> {
        let Some(end) = find_crlf(&self.buffer, self.max) else {
            return match self.buffer.len() > 32 {
                true => Err(ProtocolError("invalid multibulk length".into())),
                false => Ok(None),
            };
        };
        debug_assert_eq!(self.buffer[0], kind);
        let n = parse_int(&self.buffer[1..end])
            .ok_or_else(|| ProtocolError("invalid multibulk length".into()))?;
        self.buffer.advance(end + 2);
        Ok(Some((n, end + 2)))
    }

    /// An inline request (words separated by spaces, ended by `\n`), consumed.
    fn inline(&mut self) -> Result<Option<(Vec<Bytes>, usize)>, ProtocolError> {
        let Some(end) = self
            .buffer
            .iter()
            .take(self.max + 1)
            .position(|&b| b == b'\n')
        else {
            return match self.buffer.len() > self.max {
                true => Err(ProtocolError("too big inline request".into())),
                false => Ok(None),
            };
        };
        let line = self.buffer.split_to(end + 1).freeze();
        let text = line.slice(..end);
        let text = match text.last() {
            Some(b'\r') => text.slice(..text.len() - 1),
            _ => text,
        };
        Ok(Some((split_inline(&text)?, end + 1)))
    }
}

/// An inline request's words as Redis splits them (`sdssplitargs`): separated by spaces;
/// `"…"` with the escapes `\n \r \t \b \a \xHH` and `\` before any other byte, `'…'` with
/// `\'`; a closing quote must end its word. A word without quotes is a slice of `text`.
fn split_inline(text: &Bytes) -> Result<Vec<Bytes>, ProtocolError> {
    let unbalanced = || ProtocolError("unbalanced quotes in request".into());
    let mut args = Vec::new();
    let mut at = 0;
    loop {
        while text.get(at).is_some_and(|b| b.is_ascii_whitespace()) {
            at += 1;
        }
        if at == text.len() {
            return Ok(args);
        }
        let from = at;
        while text
            .get(at)
            .is_some_and(|b| !b.is_ascii_whitespace() && !matches!(b, b'"' | b'\''))
        {
            at += 1;
        }
        if !text.get(at).is_some_and(|b| matches!(b, b'"' | b'\'')) {
            args.push(text.slice(from..at));
            continue;
        }
        // A quote: this word is built byte by byte.
        let mut word = text[from..at].to_vec();
        loop {
            match text.get(at) {
                None => break,
                Some(b) if b.is_ascii_whitespace() => break,
                Some(&quote @ (b'"' | b'\'')) => {
                    at += 1;
                    loop {
                        let &b = text.get(at).ok_or_else(unbalanced)?;
                        at += 1;
                        match (quote, b) {
                            (_, b) if b == quote => break,
                            (b'"', b'\\') => {
                                let &next = text.get(at).ok_or_else(unbalanced)?;
                                let hex = text
                                    .get(at + 1..at + 3)
                                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                                    .and_then(|h| {
                                        let h = std::str::from_utf8(h).ok()?;
                                        u8::from_str_radix(h, 16).ok()
                                    });
                                match (next, hex) {
                                    (b'x', Some(byte)) => {
                                        word.push(byte);
                                        at += 3;
                                        continue;
                                    }
                                    (b'n', _) => word.push(b'\n'),
                                    (b'r', _) => word.push(b'\r'),
                                    (b't', _) => word.push(b'\t'),
                                    (b'b', _) => word.push(0x08),
                                    (b'a', _) => word.push(0x07),
                                    (other, _) => word.push(other),
                                }
                                at += 1;
                            }
                            (b'\'', b'\\') if text.get(at) == Some(&b'\'') => {
                                word.push(b'\'');
                                at += 1;
                            }
                            (_, b) => word.push(b),
                        }
                    }
                    // A closing quote ends its word.
                    if text.get(at).is_some_and(|b| !b.is_ascii_whitespace()) {
                        return Err(unbalanced());
                    }
                }
                Some(&b) => {
                    word.push(b);
                    at += 1;
                }
            }
        }
        args.push(Bytes::from(word));
    }
}

/// Where the CRLF ending a header is, looking no further than a header can be long.
fn find_crlf(buffer: &[u8], max: usize) -> Option<usize> {
    let window = &buffer[..buffer.len().min(32.min(max + 2))];
    let at = window.iter().position(|&b| b == b'\r')?;
    (buffer.get(at + 1)? == &b'\n').then_some(at)
}

/// A decimal integer as Redis writes lengths: an optional `-`, then digits, nothing else.
fn parse_int(digits: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(digits).ok()?;
    if text.is_empty() || text.starts_with('+') {
        return None;
    }
    text.parse().ok()
}

fn shown_byte(byte: u8) -> String {
    match byte {
        0x20..=0x7e => (byte as char).to_string(),
        other => format!("\\x{other:02x}"),
    }
}

/// At most 128 bytes of `bytes`, as text that fits on one line.
pub fn shown(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(128)];
    String::from_utf8_lossy(cut)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Writes replies in the protocol a connection speaks (2 or 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply(pub u8);

impl Reply {
    pub fn resp3(self) -> bool {
        self.0 >= 3
    }

    pub fn simple(self, out: &mut Vec<u8>, text: &str) {
        out.push(b'+');
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// An error: `text` starts with its code (`ERR`, `READONLY`, …). Line breaks become spaces.
    pub fn error(self, out: &mut Vec<u8>, text: &str) {
        out.push(b'-');
        out.extend(text.bytes().map(|b| match b {
            b'\r' | b'\n' => b' ',
            b => b,
        }));
        out.extend_from_slice(b"\r\n");
    }

    pub fn int(self, out: &mut Vec<u8>, n: i64) {
        header(out, b':', n);
    }

    pub fn bulk(self, out: &mut Vec<u8>, bytes: &[u8]) {
        header(out, b'$', bytes.len() as i64);
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }

    /// A missing value: `$-1` in RESP2, `_` in RESP3.
    pub fn nil(self, out: &mut Vec<u8>) {
        out.extend_from_slice(match self.resp3() {
            true => b"_\r\n",
            false => b"$-1\r\n",
        });
    }

    pub fn array(self, out: &mut Vec<u8>, len: usize) {
        header(out, b'*', len as i64);
    }

    /// A map of `len` pairs: `%` in RESP3, a flat array in RESP2.
    pub fn map(self, out: &mut Vec<u8>, len: usize) {
        match self.resp3() {
            true => header(out, b'%', len as i64),
            false => self.array(out, 2 * len),
        }
    }

    /// A set: `~` in RESP3, an array in RESP2.
    pub fn set(self, out: &mut Vec<u8>, len: usize) {
        match self.resp3() {
            true => header(out, b'~', len as i64),
            false => self.array(out, len),
        }
    }

    /// The header of an out-of-band message (RESP3 only): `>len`.
    pub fn push(self, out: &mut Vec<u8>, len: usize) {
        header(out, b'>', len as i64);
    }
}

/// A frame's type byte, a decimal number and CRLF, written without allocating.
fn header(out: &mut Vec<u8>, kind: u8, n: i64) {
    out.push(kind);
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(max: usize, chunks: &[&[u8]]) -> Result<Vec<Vec<String>>, ProtocolError> {
        let mut requests = Requests::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            requests.spare().extend_from_slice(chunk);
            while let Some((args, _)) = requests.next_request()? {
                out.push(
                    args.iter()
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect(),
                );
            }
        }
        Ok(out)
    }

    #[test]
    fn multibulk_and_inline_requests_read_as_redis_reads_them() {
        let whole =
            b"*2\r\n$3\r\nGET\r\n$6\r\nuser:a\r\nPING\r\n  GET   x \r\n\r\n*0\r\n*1\r\n$0\r\n\r\n";
        let expected = vec![
            vec!["GET".to_owned(), "user:a".to_owned()],
            vec!["PING".to_owned()],
            vec!["GET".to_owned(), "x".to_owned()],
            vec![String::new()],
        ];
        assert_eq!(read_all(1024, &[whole]).unwrap(), expected);
        // The same bytes one at a time: nothing is lost or read twice between chunks.
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(read_all(1024, &bytes).unwrap(), expected);
        // A bulk string holds any bytes, CRLF included.
        let binary = b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n";
        assert_eq!(read_all(1024, &[binary]).unwrap()[0][1], "a\r\nb");
    }

    #[test]
    fn requests_that_break_the_protocol_are_refused_before_their_bytes_are_buffered() {
        let refused = |bytes: &[u8]| read_all(1024, &[bytes]).unwrap_err().0;
        // Nested arrays, another frame type, a bad length, a length past the bound.
        assert!(refused(b"*1\r\n*1\r\n$1\r\na\r\n").contains("expected '$', got '*'"));
        assert!(refused(b"*1\r\n:5\r\n").contains("expected '$', got ':'"));
        assert!(refused(b"*1\r\n$x\r\n").contains("invalid bulk length"));
        assert!(refused(b"*1\r\n$-1\r\n").contains("invalid bulk length"));
        assert!(refused(b"*1\r\n$999999999999\r\n").contains("invalid bulk length"));
        assert!(refused(b"*1\r\n$1025\r\n").contains("invalid bulk length"));
        assert!(refused(b"*999999999\r\n").contains("invalid multibulk length"));
        assert!(refused(b"*+1\r\n").contains("invalid multibulk length"));
        assert!(refused(b"*1\r\n$1\r\nab\r\n").contains("CRLF"));
        // Many arguments whose sum passes the bound.
        let mut many = b"*100\r\n".to_vec();
        for _ in 0..100 {
            many.extend_from_slice(b"$20\r\naaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(refused(&many).contains("longer than 1024 bytes"));
        // A header or an inline line that never ends is refused once it is longer than one can be.
        assert!(refused(b"*11111111111111111111111111111111111").contains("multibulk length"));
        assert!(refused(&[b'x'; 1100]).contains("too big inline request"));
        // Incomplete but legal: nothing yet, no error.
        assert_eq!(
            read_all(1024, &[b"*2\r\n$3\r\nGET\r\n$100\r\nab"])
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn inline_words_are_split_as_redis_splits_them_quotes_and_escapes_included() {
        // Each answer checked against redis-server 7 (ECHO of the same line).
        let words = |line: &str| {
            read_all(1024, &[format!("{line}\r\n").as_bytes()]).map(|mut r| r.remove(0))
        };
        let cases = [
            (r#"ECHO "a b""#, "a b"),
            (r#"ECHO "x\x41\x4g\n""#, "xAx4g\n"),
            (r#"ECHO 'it\'s'"#, "it's"),
            (r#"ECHO 'a\nb'"#, "a\\nb"),
            (r#"ECHO "\q\\""#, "q\\"),
            ("ECHO   spaced   ", "spaced"),
            (r#"ECHO """#, ""),
            ("ECHO ''", ""),
        ];
        for (line, word) in cases {
            assert_eq!(words(line), Ok(vec!["ECHO".into(), word.into()]), "{line}");
        }
        for line in [
            r#"ECHO ab"cd ef"gh"#,
            r#"ECHO "unterminated"#,
            r#"ECHO "a"b"#,
        ] {
            let refused = words(line).unwrap_err();
            assert_eq!(refused.0, "unbalanced quotes in request", "{line}");
        }
    }

    #[test]
    fn a_long_argument_gets_its_room_once_not_a_read_at_a_time() {
        let mut requests = Requests::new(1 << 20);
        let value = vec![b'v'; 300_000];
        let mut stream = b"*2\r\n$4\r\nECHO\r\n$300000\r\n".to_vec();
        stream.extend_from_slice(&value);
        stream.extend_from_slice(b"\r\n");
        let mut chunks = stream.chunks(16 * 1024);
        requests.spare().extend_from_slice(chunks.next().unwrap());
        assert_eq!(requests.next_request(), Ok(None));
        let room = requests.spare().capacity();
        assert!(room >= value.len(), "{room}");
        for chunk in chunks {
            let buffer = requests.spare();
            assert_eq!(
                buffer.capacity(),
                room,
                "no reallocation while the argument arrives"
            );
            buffer.extend_from_slice(chunk);
        }
        let (args, size) = requests.next_request().unwrap().unwrap();
        assert_eq!((&args[1][..], size), (&value[..], stream.len()));
    }

    #[test]
    fn replies_are_written_in_the_connection_s_protocol() {
        let mut out = Vec::new();
        for proto in [Reply(2), Reply(3)] {
            proto.nil(&mut out);
            proto.map(&mut out, 1);
            proto.set(&mut out, 2);
        }
        Reply(2).error(&mut out, "ERR a\r\nb");
        Reply(2).bulk(&mut out, b"x");
        Reply(3).push(&mut out, 2);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "$-1\r\n*2\r\n*2\r\n_\r\n%1\r\n~2\r\n-ERR a  b\r\n$1\r\nx\r\n>2\r\n"
        );
    }
}
