//! CPU cost of the model-free stages per event: Avro decode, chunking + BM25 enrichment,
//! Avro encode of the enriched event. `cargo bench --bench pipeline`.

use std::hint::black_box;

use convoflow::codec::{RecordCodec, WireFormat};
use convoflow::event::{Conversation, EnrichedConversation, SourceRef};
use convoflow::pipeline::bm25::Bm25Params;
use convoflow::pipeline::chunk::{Chunker, builtin_tokenizer};
use convoflow::pipeline::text::{EnrichInput, TextEnricher};
use convoflow::sample::SampleGenerator;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn stages(c: &mut Criterion) {
    let g = SampleGenerator::new(5);
    let events: Vec<Conversation> = (0..64).map(|n| g.conversation(n)).collect();
    let turns: usize = events.iter().map(|e| e.turns.len()).sum();
    let input = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let output = RecordCodec::<EnrichedConversation>::new(WireFormat::Avro).unwrap();
    let encoded: Vec<Vec<u8>> = events.iter().map(|e| input.encode(e).unwrap()).collect();
    let enricher = TextEnricher::new(Chunker::new(builtin_tokenizer(), 256, 32).unwrap(), Bm25Params::default());
    let source = SourceRef { topic: "bench".into(), partition: 0, offset: 0 };
    let inputs: Vec<EnrichInput<'_>> =
        events.iter().map(|c| EnrichInput { conversation: c, source: source.clone() }).collect();
    let enrich_all = |inputs: &[EnrichInput<'_>]| inputs.iter().map(|i| enricher.enrich_one(i).unwrap()).collect::<Vec<_>>();
    let enriched = enrich_all(&inputs);

    let mut group = c.benchmark_group("per 64 conversations");
    group.throughput(Throughput::Elements(turns as u64));
    group.bench_function("avro decode", |b| {
        b.iter(|| encoded.iter().map(|bytes| input.decode(black_box(bytes)).unwrap()).count())
    });
    group.bench_function("chunk + tokens + bm25", |b| b.iter(|| enrich_all(black_box(&inputs))));
    group.bench_function("avro encode enriched", |b| {
        b.iter(|| enriched.iter().map(|e| output.encode(black_box(e)).unwrap().len()).sum::<usize>())
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
