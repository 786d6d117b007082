//! The fuzz targets' smoke pass, in every `cargo test`: each target body runs over its seed corpus
//! (`fuzz/seeds/`) and over seeded random mutations of it for a bounded time. The real fuzzing is
//! `scripts/fuzz` (cargo-fuzz, libFuzzer); this keeps the targets compiling and their invariants
//! holding without it.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long each target's mutations run.
const BUDGET: Duration = Duration::from_secs(5);

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty());
    seeds
}

/// splitmix64.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A few byte-level mutations of `seed`, as a fuzzer's would be: flips, inserts of interesting
/// bytes, deletions, duplications, splices with another seed.
fn mutate(seed: &[u8], other: &[u8], state: &mut u64) -> Vec<u8> {
    const INTERESTING: &[u8] = b"\n\r\"\\{}[],:0-eE\x00\xff \t";
    let mut data = seed.to_vec();
    for _ in 0..1 + next(state) % 4 {
        let at = if data.is_empty() {
            0
        } else {
            (next(state) as usize) % data.len()
        };
        match next(state) % 6 {
            0 if !data.is_empty() => data[at] ^= 1 << (next(state) % 8),
            1 => data.insert(at, INTERESTING[(next(state) as usize) % INTERESTING.len()]),
            2 if !data.is_empty() => {
                data.remove(at);
            }
            3 => {
                let end = (at + 1 + (next(state) as usize) % 16).min(data.len());
                let piece = data[at..end].to_vec();
                data.splice(at..at, piece);
            }
            4 if !other.is_empty() => {
                let from = (next(state) as usize) % other.len();
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            _ => data.push(INTERESTING[(next(state) as usize) % INTERESTING.len()]),
        }
    }
    data
}

fn smoke(target: &str, body: fn(&[u8])) {
    let seeds = seeds(target);
    for seed in &seeds {
        body(seed);
    }
    let mut state = 0x5EED_u64;
    let started = Instant::now();
    let mut runs = 0u64;
    while started.elapsed() < BUDGET {
        let a = &seeds[(next(&mut state) as usize) % seeds.len()];
        let b = &seeds[(next(&mut state) as usize) % seeds.len()];
        let input = mutate(a, b, &mut state);
        let result = std::panic::catch_unwind(|| body(&input));
        assert!(result.is_ok(), "{target} failed on {input:?}");
        runs += 1;
    }
    eprintln!("{target}: {runs} inputs in {BUDGET:?}");
    assert!(runs > 1000, "too few inputs to mean anything: {runs}");
}

#[test]
fn the_request_parser_holds_its_invariants_over_the_corpus_and_mutations() {
    smoke("request", cacheward::rpc::fuzzing::request);
}

#[test]
fn the_line_framer_holds_its_invariants_over_the_corpus_and_mutations() {
    smoke("framer", cacheward::rpc::fuzzing::framer);
}

#[test]
fn the_resp_request_reader_holds_its_invariants_over_the_corpus_and_mutations() {
    smoke("resp_requests", cacheward::resp::fuzzing::requests);
}
