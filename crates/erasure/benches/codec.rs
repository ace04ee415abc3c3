//! Encode and reconstruct throughput of the Reed-Solomon codec for 4+2 and 8+3 with the
//! fragment sizes the data path uses (64 KiB and 256 KiB), as data bytes per second, beside a
//! memcpy of the same bytes measured in the same run (the baseline).
//!
//! Run: `cargo bench -p brickfs-erasure --bench codec`.

use brickfs_erasure::{Codec, ReedSolomonCodec};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    for (k, m) in [(4usize, 2usize), (8, 3)] {
        for frag in [64usize << 10, 256 << 10] {
            let codec = ReedSolomonCodec::new(k, m).unwrap();
            let data: Vec<Vec<u8>> = (0..k).map(|i| vec![i as u8 ^ 0x5a; frag]).collect();
            let mut parity = vec![vec![0u8; frag]; m];
            let mut g = c.benchmark_group(format!("rs-{k}+{m}-{}KiB", frag >> 10));
            g.throughput(Throughput::Bytes((k * frag) as u64));
            g.bench_function("memcpy-baseline", |b| {
                let mut out = vec![0u8; k * frag];
                b.iter(|| {
                    for (i, d) in data.iter().enumerate() {
                        out[i * frag..(i + 1) * frag].copy_from_slice(black_box(d));
                    }
                })
            });
            g.bench_function("encode", |b| {
                b.iter(|| {
                    let d: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
                    let mut p: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
                    codec.encode(black_box(&d), &mut p).unwrap();
                })
            });
            let d: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let mut p: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
            codec.encode(&d, &mut p).unwrap();
            let full: Vec<Vec<u8>> = data.iter().cloned().chain(parity.iter().cloned()).collect();
            g.bench_function(format!("reconstruct-{m}-missing"), |b| {
                b.iter(|| {
                    let mut frags: Vec<Option<Vec<u8>>> = full.iter().cloned().map(Some).collect();
                    for f in frags.iter_mut().take(m) {
                        *f = None;
                    }
                    codec.reconstruct_data(black_box(&mut frags)).unwrap();
                })
            });
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
