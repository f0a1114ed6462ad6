//! The at-least-once Kafka spine against a real broker: end to end, crash and restart,
//! scale-out and rebalance, poison messages, graceful shutdown.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use common::*;
use convoflow::codec::{RecordCodec, WireFormat};
use convoflow::event::Conversation;
use convoflow::sample::SampleGenerator;

/// Sample conversation `n` with `turns` turns of the same sentence, as a keyed Avro record.
fn keyed_with_turns(g: &SampleGenerator, codec: &RecordCodec<Conversation>, n: u64, turns: usize) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let mut c = g.conversation(n);
    let t = c.turns[0].clone();
    c.turns = (0..turns)
        .map(|i| convoflow::event::Turn {
            turn_id: format!("t{i}"),
            text: "the quick brown fox jumps over the lazy dog again and again".into(),
            ..t.clone()
        })
        .collect();
    (Some(c.conversation_id.clone().into_bytes()), Some(codec.encode(&c).unwrap()))
}

/// Points of `conversation_id` in the embedded store of the test worker `name` (stopped).
async fn points_of(topics: &Topics, name: &str, conversation_id: &str) -> u64 {
    use convoflow::sink::store::{self, Bootstrap, SearchFilter};
    let cfg = convoflow::config::QdrantConfig { data_dir: store_dir(&topics.group, name), ..Default::default() };
    let s = store::open(&cfg).unwrap();
    s.ensure_collection(&store::collection_spec(&cfg, 8), Bootstrap::MustExist).await.unwrap();
    s.count(&SearchFilter { conversation_id: Some(conversation_id.into()), ..Default::default() }).await.unwrap()
}

/// Input records of a topic as (partition, offset) -> decoded conversation.
fn read_inputs(topic: &str, expected: usize) -> BTreeMap<(i32, i64), Conversation> {
    let codec = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let records = read_topic(topic, expected, Duration::from_secs(30), Duration::from_millis(200));
    assert_eq!(records.len(), expected, "input topic holds what was produced");
    records.iter().map(|r| ((r.partition, r.offset), codec.decode(r.payload.as_ref().unwrap()).unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_200_conversations_and_enrich_each_event_once_in_key_order() {
    let topics = Topics::new("e2e");
    create_topic(&topics.input, 6).await;
    // publish through the CLI, as a user would
    let out = Command::new(env!("CARGO_BIN_EXE_convoflow"))
        .args(["produce", "--count", "200", "--seed", "11", "--topic", &topics.input])
        .env("CONVOFLOW__KAFKA__BROKERS", brokers())
        .output()
        .unwrap();
    assert!(out.status.success(), "produce failed: {}", String::from_utf8_lossy(&out.stderr));
    let expected_events = sample_events(11, 200);
    let inputs = read_inputs(&topics.input, expected_events.len());
    let turns: usize = inputs.values().map(|c| c.turns.len()).sum();
    assert!((4_000..=6_000).contains(&turns), "about 5,000 turns, got {turns}");

    let mut worker = Worker::start("e2e", &topics, &[]);
    let records = wait_for_distinct_sources(&topics.output, inputs.len(), Duration::from_secs(120));
    // let the final commit interval pass, then stop gracefully
    std::thread::sleep(Duration::from_millis(1500));
    worker.signal("TERM");
    let (code, _) = worker.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{}", worker.log_text());

    // exactly one enriched event per input event, matching it turn for turn
    assert_eq!(records.len(), inputs.len(), "one output per input, no duplicates");
    let outputs = by_source(&records);
    for (source, input) in &inputs {
        let out = &outputs.get(source).unwrap_or_else(|| panic!("no output for {source:?}"))[0];
        assert_eq!(out.conversation_id, input.conversation_id);
        assert_eq!(out.source.topic, topics.input);
        let ids: Vec<_> = out.turns.iter().map(|t| &t.turn_id).collect();
        assert_eq!(ids, input.turns.iter().map(|t| &t.turn_id).collect::<Vec<_>>());
        assert!(out.turns.iter().all(|t| t.token_count > 0 && !t.point_ids.is_empty()));
    }
    // per-key order: within each output partition, a key's events follow input offsets
    let mut last_seen: HashMap<Vec<u8>, (i32, i64)> = HashMap::new();
    let mut sorted = records.clone();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in &sorted {
        let e = r.enriched();
        assert_eq!(r.key.as_deref(), Some(e.conversation_id.as_bytes()), "output keyed by conversation id");
        let src = (e.source.partition, e.source.offset);
        if let Some(prev) = last_seen.insert(r.key.clone().unwrap(), src) {
            assert_eq!(prev.0, src.0, "one key, one input partition");
            assert!(prev.1 < src.1, "key {:?} out of order: {prev:?} then {src:?}", e.conversation_id);
        }
    }
    // all offsets committed: lag 0 on every partition
    let lag = lag(&topics.group, &topics.input);
    assert!(lag.values().all(|&l| l == 0), "lag after drain: {lag:?}");
    assert!(read_topic(&topics.dlq(), 1, Duration::from_secs(2), Duration::ZERO).is_empty(), "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_restart_loses_nothing() {
    let topics = Topics::new("kill");
    create_topic(&topics.input, 3).await;
    let events = sample_events(21, 300);
    produce_conversations(&topics.input, &events).await;
    let total = events.len();

    let mut first = Worker::start("first", &topics, SLOW);
    let seen = read_topic(&topics.output, total / 3, Duration::from_secs(120), Duration::ZERO);
    first.signal("KILL");
    let (code, _) = first.wait_exit(Duration::from_secs(5));
    assert_eq!(code, None, "killed by the signal");
    assert!(seen.len() < total, "the first worker must be interrupted mid-run ({} of {total})", seen.len());
    let committed_at_kill = committed(&topics.group, &topics.input);
    let high = high_watermarks(&topics.input);
    assert!(
        committed_at_kill.iter().any(|(p, c)| *c < high[p]),
        "work was left at the kill: committed {committed_at_kill:?}, end {high:?}"
    );

    let mut second = Worker::start("second", &topics, &[]);
    let records = wait_for_distinct_sources(&topics.output, total, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(1500));
    second.signal("TERM");
    assert_eq!(second.wait_exit(Duration::from_secs(15)).0, Some(0));

    let outputs = by_source(&records);
    for (p, end) in &high {
        for offset in 0..*end {
            let n = outputs.get(&(*p, offset)).map_or(0, Vec::len);
            assert!(n >= 1, "input {p}/{offset} has no enriched event");
            if n > 1 {
                let c = committed_at_kill[p];
                assert!(offset >= c, "input {p}/{offset} duplicated although committed ({c}) before the kill");
            }
        }
    }
    assert!(lag(&topics.group, &topics.input).values().all(|&l| l == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_partitions_and_survive_one_leaving() {
    let topics = Topics::new("scale");
    create_topic(&topics.input, 6).await;
    let g = SampleGenerator::new(31);
    let batch = |from: u64, to: u64| (from..to).flat_map(|n| g.conversation_events(n)).collect::<Vec<_>>();
    let mut produced = batch(0, 100);
    produce_conversations(&topics.input, &produced).await;

    let mut a = Worker::start("a", &topics, &[]);
    a.wait_for_log("partitions assigned", Duration::from_secs(60));
    let mut b = Worker::start("b", &topics, &[]);
    b.wait_for_log("partitions assigned", Duration::from_secs(60));
    // wait until A's latest assignment reflects the split
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (la, lb) = (a.assignments(), b.assignments());
        let (last_a, last_b) = (la.last().cloned().unwrap_or_default(), lb.last().cloned().unwrap_or_default());
        if !last_a.is_empty() && !last_b.is_empty() && last_a.len() + last_b.len() == 6 {
            let mut all: Vec<_> = last_a.iter().chain(&last_b).copied().collect();
            all.sort();
            assert_eq!(all, (0..6).collect::<Vec<_>>(), "the two assignments partition the topic");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no split: a {la:?} b {lb:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let more = batch(100, 200);
    produce_conversations(&topics.input, &more).await;
    produced.extend(more);
    std::thread::sleep(Duration::from_secs(2));

    b.signal("TERM");
    assert_eq!(b.wait_exit(Duration::from_secs(15)).0, Some(0), "{}", b.log_text());
    let last = batch(200, 300);
    produce_conversations(&topics.input, &last).await;
    produced.extend(last);

    let records = wait_for_distinct_sources(&topics.output, produced.len(), Duration::from_secs(120));
    let outputs = by_source(&records);
    assert_eq!(outputs.len(), produced.len(), "every event enriched, none lost");
    let high = high_watermarks(&topics.input);
    assert_eq!(high.values().sum::<i64>() as usize, produced.len());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while a.assignments().last().map_or(0, Vec::len) != 6 {
        assert!(std::time::Instant::now() < deadline, "A never took all partitions: {:?}", a.assignments());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    a.signal("TERM");
    assert_eq!(a.wait_exit(Duration::from_secs(15)).0, Some(0));
    assert!(lag(&topics.group, &topics.input).values().all(|&l| l == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dlq_with_reasons_and_the_worker_moves_on() {
    let topics = Topics::new("poison");
    create_topic(&topics.input, 2).await;
    let codec = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let g = SampleGenerator::new(41);
    let valid = |n: u64| {
        let c = g.conversation(n);
        (Some(c.conversation_id.clone().into_bytes()), Some(codec.encode(&c).unwrap()))
    };
    let good_bytes = codec.encode(&g.conversation(99)).unwrap();
    let mut wrong_fp = good_bytes.clone();
    wrong_fp[3] ^= 0x5a;
    let mut huge = g.conversation(98);
    huge.turns[0].text = "bla ".repeat(5 * 1024 * 1024 / 4); // a 5 MB turn
    let mut many_turns = g.conversation(96);
    let template = many_turns.turns[0].clone();
    many_turns.turns = (0..20_000)
        .map(|i| convoflow::event::Turn { turn_id: format!("t{i}"), text: "ok".into(), ..template.clone() })
        .collect();
    let mut nul_id = g.conversation(95);
    nul_id.turns[0].turn_id = "t\u{0}1".into();
    let mut far_ts = g.conversation(94);
    far_ts.turns[0].ts = i64::MAX;
    let mut blank = g.conversation(92);
    blank.turns.iter_mut().enumerate().for_each(|(i, t)| t.text = if i % 2 == 0 { String::new() } else { " \t\n ".into() });
    let mut invisible = g.conversation(90);
    let marks = ["\u{200B}", "\u{202E}\u{2066}", "\u{FEFF}", "\u{200D}\u{2060}"];
    invisible.turns.iter_mut().enumerate().for_each(|(i, t)| t.text = marks[i % marks.len()].into());
    let mut long_id = g.conversation(89);
    long_id.conversation_id = "c".repeat(1 << 20);
    let mut twice = g.conversation(91);
    twice.turns[1].turn_id = twice.turns[0].turn_id.clone();
    let mut unknown_confluent = vec![0u8, 0, 1, 0x86, 0x9f]; // magic 0, schema id 99,999: no registry knows it
    unknown_confluent.extend_from_slice(&good_bytes[10..]);
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    let mut nine_mb = g.conversation(93);
    nine_mb.turns = (0..9)
        .map(|i| convoflow::event::Turn { turn_id: format!("big{i}"), text: "x".repeat(1_000_000), ..template.clone() })
        .collect();
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", (1..513u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()),
        ("truncated avro", good_bytes[..good_bytes.len() / 2].to_vec()),
        ("wrong fingerprint", wrong_fp),
        ("5 MB turn", codec.encode(&huge).unwrap()),
        ("missing required fields", br#"{"tenant":"acme","started_at":1,"turns":[]}"#.to_vec()),
        ("invalid utf-8 json", b"{\"conversation_id\":\"c\xff\xfe\",\"tenant\":\"t\",\"started_at\":1,\"turns\":[]}".to_vec()),
        ("key differs from conversation_id", codec.encode(&g.conversation(97)).unwrap()),
        ("20,000 turns", codec.encode(&many_turns).unwrap()),
        ("NUL in a turn id", codec.encode(&nul_id).unwrap()),
        ("ts out of range", codec.encode(&far_ts).unwrap()),
        ("9 MB event", codec.encode(&nine_mb).unwrap()),
        ("empty value", vec![]),
        ("1 byte", vec![0xc3]),
        ("unknown Confluent schema id", unknown_confluent),
        ("empty and whitespace turns", codec.encode(&blank).unwrap()),
        ("duplicate turn ids", codec.encode(&twice).unwrap()),
        ("deeply nested JSON", nested),
        ("invisible-only turns", codec.encode(&invisible).unwrap()),
        ("1 MiB conversation_id", codec.encode(&long_id).unwrap()),
    ];
    let mut records = Vec::new();
    for (i, (name, bytes)) in poison.iter().enumerate() {
        records.push(valid(i as u64));
        records.push((Some(format!("poison-{name}").into_bytes()), Some(bytes.clone())));
    }
    records.push(valid(50));
    records.push((None, None)); // a tombstone without a key: no conversation to delete
    records.push(valid(51));
    let positions = produce_raw(&topics.input, &records).await;
    let keyless_tombstone = positions[positions.len() - 2];
    let poison_positions: Vec<(i32, i64)> = positions.iter().skip(1).step_by(2).take(poison.len()).copied().collect();

    let mut worker = Worker::start("poison", &topics, &[]);
    let dlq = read_topic(&topics.dlq(), poison.len() + 1, Duration::from_secs(90), Duration::from_millis(500));
    let out = wait_for_distinct_sources(&topics.output, poison.len() + 2, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));
    let status = std::fs::read_to_string(format!("/proc/{}/status", worker.pid())).unwrap_or_default();
    let peak = status.lines().find(|l| l.starts_with("VmHWM")).unwrap_or("VmHWM: ?").to_string();
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(15)).0, Some(0), "{}", worker.log_text());
    println!("poison: {} classes + a keyless tombstone dead-lettered, {} valid enriched; worker peak RSS {peak}", poison.len(), poison.len() + 2);

    assert_eq!(dlq.len(), poison.len() + 1, "each poison message dead-lettered once");
    assert_eq!(by_source(&out).len(), poison.len() + 2, "every valid message enriched");
    let tombstone = dlq
        .iter()
        .find(|r| r.headers["dlq.original.offset"] == keyless_tombstone.1.to_string()
            && r.headers["dlq.original.partition"] == keyless_tombstone.0.to_string())
        .expect("the keyless tombstone in the DLQ");
    assert_eq!(tombstone.headers["dlq.error.class"], "validation");
    assert!(tombstone.key.is_none() && tombstone.payload.is_none());
    let kb: u64 = peak.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(kb < 1_500_000, "worker RSS bounded by the input limits: {peak}");
    let expected_class = [
        "deserialization",
        "deserialization",
        "unknown-schema",
        "validation",
        "deserialization",
        "deserialization",
        "validation",
        "validation",
        "validation",
        "validation",
        "validation",
        "deserialization",
        "deserialization",
        "unknown-schema",
        "validation",
        "validation",
        "deserialization",
        "validation",
        "validation",
    ];
    for (((name, bytes), pos), class) in poison.iter().zip(&poison_positions).zip(expected_class) {
        let rec = dlq
            .iter()
            .find(|r| r.headers.get("dlq.original.offset") == Some(&pos.1.to_string())
                && r.headers.get("dlq.original.partition") == Some(&pos.0.to_string()))
            .unwrap_or_else(|| panic!("{name} not in the DLQ"));
        assert_eq!(rec.headers["dlq.error.class"], class, "{name}: {:?}", rec.headers);
        assert!(!rec.headers["dlq.error.message"].is_empty());
        assert_eq!(rec.headers["dlq.original.topic"], topics.input);
        assert_eq!(rec.payload.as_deref(), Some(bytes.as_slice()), "{name}: original value kept");
        assert_eq!(rec.key.as_deref(), Some(format!("poison-{name}").as_bytes()));
    }
    let msg = |name: &str| {
        let pos = poison_positions[poison.iter().position(|(n, _)| *n == name).unwrap()];
        dlq.iter()
            .find(|r| r.headers["dlq.original.offset"] == pos.1.to_string() && r.headers["dlq.original.partition"] == pos.0.to_string())
            .unwrap()
            .headers["dlq.error.message"]
            .clone()
    };
    assert!(msg("5 MB turn").contains("over the limit"), "{}", msg("5 MB turn"));
    assert!(msg("missing required fields").contains("missing field `conversation_id`"));
    assert!(msg("wrong fingerprint").contains("unknown writer schema fingerprint"));
    assert!(msg("key differs from conversation_id").contains("differs from conversation_id"));
    assert!(msg("20,000 turns").contains("max_turns_per_event"), "{}", msg("20,000 turns"));
    assert!(msg("NUL in a turn id").contains("NUL"), "{}", msg("NUL in a turn id"));
    assert!(msg("ts out of range").contains("outside the representable time range"), "{}", msg("ts out of range"));
    assert!(msg("9 MB event").contains("max_event_bytes"), "{}", msg("9 MB event"));
    assert!(msg("empty and whitespace turns").contains("no turn has text"), "{}", msg("empty and whitespace turns"));
    assert!(msg("duplicate turn ids").contains("appears twice"), "{}", msg("duplicate turn ids"));
    assert!(msg("unknown Confluent schema id").contains("99999"), "{}", msg("unknown Confluent schema id"));
    assert!(msg("invisible-only turns").contains("no turn has text"), "{}", msg("invisible-only turns"));
    assert!(msg("1 MiB conversation_id").contains("max_id_bytes"), "{}", msg("1 MiB conversation_id"));
    assert!(lag(&topics.group, &topics.input).values().all(|&l| l == 0), "committed past the poison");
}

/// An enriched event larger than the producer's `message.max.bytes` goes to the DLQ (class
/// `output-too-large`, the input unchanged) instead of stalling its partition; a DLQ copy that is
/// itself too large keeps the start of the value and says so; the partition moves on to lag 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_poison_trips_the_dead_letter_breaker_instead_of_filling_the_dlq() {
    let topics = Topics::new("breaker");
    create_topic(&topics.input, 1).await;
    // 40 undecodable records in a row: a systemic fault as far as the worker can tell
    let records: Vec<_> = (0..40u32)
        .map(|i| (Some(format!("k{i}").into_bytes()), Some((0..64u32).map(|j| (i * 31 + j * 7) as u8 ^ 0xa5).collect::<Vec<u8>>())))
        .collect();
    produce_raw(&topics.input, &records).await;
    let mut cfg = in_process_config(&topics);
    cfg.qdrant.dense_dim = Some(8);
    cfg.pipeline.dlq_max_consecutive = 10;
    cfg.pipeline.max_batch_messages = 4;
    let store = convoflow::sink::store::open(&cfg.qdrant).unwrap();
    let err = run_until(cfg, store, Duration::from_secs(60), || false).await.unwrap_err();
    assert!(format!("{err:#}").contains("pipeline.dlq_max_consecutive 10"), "{err:#}");
    // the batches before the trip were dead-lettered and committed; the rest was not
    let dead = records_in(&topics.dlq());
    // batches of at most 4: the one that reaches 10 in a row is not emitted, those before are
    assert!((6..10).contains(&dead), "{dead} dead-lettered: the breaker trips at the batch reaching 10 in a row");
    let committed = committed(&topics.group, &topics.input).get(&0).copied().unwrap_or(0);
    assert_eq!(committed.max(0), dead, "exactly what was dead-lettered is committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_too_large_to_produce_are_dead_lettered_and_the_partition_moves_on() {
    let topics = Topics::new("too-large");
    create_topic(&topics.input, 1).await;
    let codec = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let g = SampleGenerator::new(71);
    let with_turns = |n: u64, turns: usize| keyed_with_turns(&g, &codec, n, turns);
    // 200 turns: ~17 KB in, ~41 KB enriched; 370 turns: ~31 KB in, over the limit itself
    let records = vec![with_turns(0, 2), with_turns(1, 200), with_turns(2, 370), with_turns(3, 2)];
    let (big, bigger) = (records[1].1.clone().unwrap(), records[2].1.clone().unwrap());
    assert!(big.len() < 25_000 && bigger.len() > 30_000, "{} {}", big.len(), bigger.len());
    produce_raw(&topics.input, &records).await;
    let mut worker = Worker::start("too-large", &topics, &[("CONVOFLOW__KAFKA__MESSAGE_MAX_BYTES", "30000")]);
    let dlq = read_topic(&topics.dlq(), 2, Duration::from_secs(60), Duration::ZERO);
    let out = read_topic(&topics.output, 2, Duration::from_secs(30), Duration::ZERO);
    std::thread::sleep(Duration::from_millis(1500));
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(15)).0, Some(0), "{}", worker.log_text());
    assert_eq!(out.len(), 2, "the small ones are enriched");
    assert_eq!(dlq.len(), 2);
    assert!(dlq.iter().all(|r| r.headers["dlq.error.class"] == "output-too-large"), "{:?}", dlq[0].headers);
    assert!(dlq[0].headers["dlq.error.message"].contains("limit of 30000 bytes"), "{:?}", dlq[0].headers);
    assert_eq!(dlq[0].payload.as_deref(), Some(big.as_slice()), "the input, unchanged");
    assert!(!dlq[0].headers.contains_key("dlq.value.truncated"));
    assert_eq!(dlq[1].headers["dlq.value.truncated"], bigger.len().to_string());
    assert_eq!(dlq[1].payload.as_deref(), Some(&bigger[..15_000]), "the start of the input");
    assert!(lag(&topics.group, &topics.input).values().all(|&l| l == 0), "committed past them");
    // the store agrees with the output topic: no point of an event that was not produced
    // (before: the 200-turn event's points were all searchable, and upserted again on replay)
    let id = |r: &(Option<Vec<u8>>, Option<Vec<u8>>)| String::from_utf8(r.0.clone().unwrap()).unwrap();
    assert_eq!(points_of(&topics, "too-large", &id(&records[1])).await, 0, "no orphan points");
    assert!(points_of(&topics, "too-large", &id(&records[0])).await > 0, "the small ones are stored");
}

/// Headers alone near the broker's limit: a default topic takes a record with a 16,776,500-byte
/// header and a 1-byte value. Before, such headers were carried onto the enriched event and the
/// DLQ copy, which was then too large even with its value cut: the worker exited 1 at every
/// start, the partition blocked for good. Now, by default (`pipeline.max_carried_header_bytes`
/// 64 KiB) the header is dropped with a note on the records produced; with every header carried
/// (32 MiB), the enriched event is dead-lettered (`output-too-large`, none of its points stored)
/// and the DLQ copies leave the input's headers out. Either way the partition moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_with_huge_headers_never_block_their_partition() {
    let huge = "h".repeat(16_776_500);
    let codec = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let g = SampleGenerator::new(73);
    let (valid, small) = (g.conversation(0), g.conversation(1));
    let event = codec.encode(&valid).unwrap();
    // the valid event's record as large as the junk one: its header a little smaller
    let huge_too = "h".repeat(16_776_500 - event.len() - valid.conversation_id.len());
    let mut runs = vec![];
    for (name, env) in [("headers-bounded", vec![]), ("headers-carried", vec![("CONVOFLOW__PIPELINE__MAX_CARRIED_HEADER_BYTES", "33554432")])] {
        let topics = Topics::new(name);
        create_topic(&topics.input, 1).await;
        produce_with_headers(&topics.input, b"junk", b"x", &[("big", &huge)]).await;
        produce_with_headers(&topics.input, valid.conversation_id.as_bytes(), &event, &[("big", &huge_too), ("traceparent", "t-1")]).await;
        produce_with_headers(&topics.input, small.conversation_id.as_bytes(), &codec.encode(&small).unwrap(), &[]).await;
        runs.push((name, Worker::start(name, &topics, &env), topics));
    }
    for (name, worker, topics) in &mut runs {
        let expect_out = if *name == "headers-bounded" { 2 } else { 1 };
        let out = read_topic(&topics.output, expect_out, Duration::from_secs(90), Duration::ZERO);
        let dlq = read_topic(&topics.dlq(), 3 - expect_out, Duration::from_secs(30), Duration::ZERO);
        wait_for_lag_zero(topics, Duration::from_secs(30)).await;
        worker.signal("TERM");
        assert_eq!(worker.wait_exit(Duration::from_secs(15)).0, Some(0), "{}", worker.log_text());
        assert_eq!((out.len(), dlq.len()), (expect_out, 3 - expect_out), "{name}");
        assert!(dlq.iter().chain(&out).all(|r| !r.headers.contains_key("big")), "{name}: the huge header is not carried");
        if *name == "headers-bounded" {
            assert_eq!(dlq[0].headers["dlq.error.class"], "deserialization");
            assert!(dlq[0].headers["convoflow.headers.dropped"].starts_with("1 headers, 16776503 bytes"), "{:?}", dlq[0].headers);
            assert_eq!(out[0].key.as_deref(), Some(valid.conversation_id.as_bytes()));
            assert_eq!(out[0].headers["traceparent"], "t-1", "headers within the bound are carried");
            assert!(out[0].headers.contains_key("convoflow.headers.dropped"));
            assert!(!out[1].headers.contains_key("convoflow.headers.dropped"));
        } else {
            assert_eq!(dlq[0].headers["dlq.error.class"], "deserialization");
            assert_eq!(dlq[1].headers["dlq.error.class"], "output-too-large");
            assert_eq!(dlq[1].headers["dlq.headers.dropped"], format!("2 headers, {} bytes", 3 + huge_too.len() + 14));
            assert_eq!(dlq[1].payload.as_deref(), Some(codec.encode(&valid).unwrap().as_slice()), "the input value, whole");
            assert!(dlq[0].headers.contains_key("dlq.headers.dropped"));
            assert_eq!(out[0].key.as_deref(), Some(small.conversation_id.as_bytes()));
            assert_eq!(points_of(topics, *name, &valid.conversation_id).await, 0, "no point of the dead-lettered event");
        }
    }
}

/// The output and DLQ topics accept records of at most 20,000 bytes (their own
/// `max.message.bytes`), far below `kafka.message_max_bytes` (16 MiB): the worker produces within
/// the topics' limit, so a record too large is refused alone (before: the broker refused the
/// whole batch, and the small events batched with it went to the DLQ as too large).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_over_the_topics_own_size_limit_are_dead_lettered_alone_not_with_their_batch() {
    let topics = Topics::new("broker-too-large");
    create_topic(&topics.input, 1).await;
    let small = [("max.message.bytes", "20000")];
    create_topic_with(&topics.output, 1, &small).await;
    create_topic_with(&topics.dlq(), 1, &small).await;
    let codec = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let g = SampleGenerator::new(72);
    let with_turns = |n: u64, turns: usize| keyed_with_turns(&g, &codec, n, turns);
    // 120 turns: ~10 KB in (its DLQ copy fits), ~25 KB enriched (too large); 370 turns: ~31 KB in
    // (its DLQ copy is too large too: cut to half the limit)
    let records = vec![with_turns(0, 2), with_turns(1, 120), with_turns(2, 370), with_turns(3, 2)];
    let (big, bigger) = (records[1].1.clone().unwrap(), records[2].1.clone().unwrap());
    assert!(big.len() < 15_000 && bigger.len() > 30_000, "{} {}", big.len(), bigger.len());
    produce_raw(&topics.input, &records).await;
    let mut worker = Worker::start("broker-too-large", &topics, &[]);
    let dlq = read_topic(&topics.dlq(), 2, Duration::from_secs(60), Duration::ZERO);
    let out = read_topic(&topics.output, 2, Duration::from_secs(30), Duration::ZERO);
    wait_for_lag_zero(&topics, Duration::from_secs(20)).await;
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(15)).0, Some(0), "{}", worker.log_text());
    assert_eq!(out.len(), 2, "the small ones are enriched");
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    assert!(dlq.iter().all(|r| r.headers["dlq.error.class"] == "output-too-large"), "{:?}", dlq[0].headers);
    assert_eq!(dlq[0].payload.as_deref(), Some(big.as_slice()), "the input, unchanged");
    assert!(!dlq[0].headers.contains_key("dlq.value.truncated"));
    assert_eq!(dlq[1].headers["dlq.value.truncated"], bigger.len().to_string());
    let cut = dlq[1].payload.as_deref().unwrap();
    assert!(cut.len() < 20_000 / 2 && bigger.starts_with(cut), "the start of the input, {} bytes", cut.len());
    assert!(dlq[0].headers["dlq.error.message"].contains("limit of 19488 bytes"), "{:?}", dlq[0].headers);
}

/// The input record's headers (trace context) come out on its enriched event and on its DLQ
/// copy, before the DLQ's own headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_headers_are_carried_to_the_output_and_the_dlq() {
    let topics = Topics::new("headers");
    create_topic(&topics.input, 1).await;
    let codec = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let conv = SampleGenerator::new(61).conversation(0);
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let headers = [("traceparent", trace), ("tenant-hint", "acme")];
    produce_with_headers(&topics.input, conv.conversation_id.as_bytes(), &codec.encode(&conv).unwrap(), &headers).await;
    produce_with_headers(&topics.input, b"bad", b"not an event", &[("traceparent", trace)]).await;
    let mut worker = Worker::start("headers", &topics, &[]);
    let out = read_topic(&topics.output, 1, Duration::from_secs(60), Duration::ZERO);
    let dlq = read_topic(&topics.dlq(), 1, Duration::from_secs(30), Duration::ZERO);
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(15)).0, Some(0), "{}", worker.log_text());
    assert_eq!(out[0].headers["traceparent"], trace);
    assert_eq!(out[0].headers["tenant-hint"], "acme");
    assert_eq!(dlq[0].headers["traceparent"], trace);
    assert_eq!(dlq[0].headers["dlq.error.class"], "deserialization");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_within_10s_with_processed_work_committed() {
    let topics = Topics::new("term");
    create_topic(&topics.input, 3).await;
    let events = sample_events(51, 400);
    produce_conversations(&topics.input, &events).await;

    let mut worker = Worker::start("term", &topics, SLOW);
    let seen = read_topic(&topics.output, 50, Duration::from_secs(90), Duration::ZERO);
    assert!(seen.len() >= 50);
    worker.signal("TERM");
    let (code, took) = worker.wait_exit(Duration::from_secs(12));
    assert_eq!(code, Some(0), "{}", worker.log_text());
    assert!(took < Duration::from_secs(10), "exit took {took:?}");

    let committed = committed(&topics.group, &topics.input);
    let high = high_watermarks(&topics.input);
    assert!(committed.iter().any(|(p, c)| *c < high[p]), "stopped under load, not after it: {committed:?} {high:?}");
    let outputs = by_source(&read_topic(&topics.output, events.len(), Duration::from_secs(5), Duration::ZERO));
    for (p, end) in &high {
        let c = committed[p].max(0);
        for offset in 0..*end {
            let processed = outputs.contains_key(&(*p, offset));
            assert_eq!(processed, offset < c, "partition {p} offset {offset}: processed={processed}, committed up to {c}");
        }
    }
}
