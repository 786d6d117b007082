//! The RESP request reader's fuzz target body (`fuzz/` runs it under libFuzzer as
//! `resp_requests`; `tests/fuzz_smoke.rs` runs it over the seed corpus in every `cargo test`).

use super::frame::Requests;

/// A byte stream cut into reads of the sizes its first bytes choose, read with a small bound: the
/// reader never panics, never holds more than the bound plus one read, hands out requests no
/// longer than the bound, and reads exactly what it reads from the whole stream at once, the
/// error that ends it included. Each request, written again as a multibulk, reads back the same.
pub fn requests(data: &[u8]) {
    const MAX: usize = 64;
    let (sizes, stream) = data.split_at(data.len().min(4));
    let chunk = |i: usize| 1 + sizes.get(i % sizes.len().max(1)).copied().unwrap_or(7) as usize;
    let whole = read(stream, |_| stream.len().max(1), MAX);
    let pieces = read(stream, chunk, MAX);
    assert_eq!(pieces, whole, "{stream:?} read in pieces");
    for args in whole.0 {
        let mut again = format!("*{}\r\n", args.len()).into_bytes();
        for arg in &args {
            again.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            again.extend_from_slice(arg);
            again.extend_from_slice(b"\r\n");
        }
        let read_back = read(&again, |_| again.len(), again.len().max(16));
        if args.is_empty() {
            assert!(read_back.0.is_empty());
        } else {
            assert_eq!(read_back.0, vec![args], "{again:?}");
        }
    }
}

/// The requests of `stream` fed in reads of `chunk(i)` bytes, and the error that ended it.
type Read = (Vec<Vec<Vec<u8>>>, Option<String>);

fn read(stream: &[u8], chunk: impl Fn(usize) -> usize, max: usize) -> Read {
    let mut requests = Requests::new(max);
    let mut out = Vec::new();
    let (mut at, mut i) = (0, 0);
    while at < stream.len() {
        let end = (at + chunk(i)).min(stream.len());
        requests.spare().extend_from_slice(&stream[at..end]);
        at = end;
        i += 1;
        loop {
            match requests.next_request() {
                Ok(Some((args, size))) => {
                    assert!(size <= max + 2 || args.len() <= 1, "{size} bytes");
                    out.push(args.iter().map(|a| a.to_vec()).collect());
                }
                Ok(None) => break,
                Err(e) => return (out, Some(e.0)),
            }
        }
        assert!(
            requests.buffered() <= max + 256 + chunk(i),
            "buffer grew to {}",
            requests.buffered()
        );
    }
    (out, None)
}
