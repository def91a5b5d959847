use super::*;

fn line(timestamp: i64, len: usize) -> Line {
    Line {
        timestamp,
        message: "x".repeat(len),
    }
}

const NOW: i64 = 1_800_000_000_000;
const HOUR: i64 = 3600 * 1000;

#[test]
fn batches_within_the_limits() {
    /// Lines as (age before NOW, message length), then the batch sizes and lines too old.
    type Case = (Vec<(i64, usize)>, Vec<usize>, usize);
    let big = MAX_BATCH_BYTES / 4 - EVENT_OVERHEAD; // four of these fill a batch exactly
    let cases: Vec<Case> = vec![
        (vec![], vec![], 0),
        (vec![(0, 10), (0, 10)], vec![2], 0),
        ((0..10_001).map(|_| (0, 1)).collect(), vec![10_000, 1], 0),
        (
            (0..20_000).map(|_| (0, 1)).collect(),
            vec![10_000, 10_000],
            0,
        ),
        (vec![(0, big); 4], vec![4], 0),
        (vec![(0, big); 5], vec![4, 1], 0),
        (vec![(0, big + 1); 4], vec![3, 1], 0),
        // 24 hours apart still fits; a millisecond more starts a new batch.
        (vec![(24 * HOUR, 1), (0, 1)], vec![2], 0),
        (vec![(24 * HOUR + 1, 1), (0, 1)], vec![1, 1], 0),
        (vec![(30 * HOUR, 1), (20 * HOUR, 1), (0, 1)], vec![2, 1], 0),
        // Older than 14 days: not sent, counted; exactly 14 days is sent (in a batch of
        // its own: it is more than 24 hours before the next).
        (
            vec![(MAX_AGE_MS + 1, 1), (MAX_AGE_MS, 1), (0, 1)],
            vec![1, 1],
            1,
        ),
        (vec![(MAX_AGE_MS + 1, 1), (1, 1), (0, 1)], vec![2], 1),
    ];
    for (lines, sizes, too_old) in cases {
        let input: Vec<Line> = lines
            .iter()
            .map(|(age, len)| line(NOW - age, *len))
            .collect();
        let got = plan(input, NOW);
        let got_sizes: Vec<usize> = got.batches.iter().map(Vec::len).collect();
        assert_eq!(
            (got_sizes, got.too_old),
            (sizes, too_old),
            "{:?}",
            &lines[..lines.len().min(5)]
        );
        for b in &got.batches {
            assert!(b.iter().map(Line::cost).sum::<usize>() <= MAX_BATCH_BYTES);
            assert!(b.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        }
    }
}

#[test]
fn chronological_and_stable() {
    let l = |t, m: &str| Line {
        timestamp: t,
        message: m.into(),
    };
    let got = plan(
        vec![l(NOW, "c"), l(NOW - 5, "a"), l(NOW, "d"), l(NOW - 5, "b")],
        NOW,
    );
    let order: Vec<&str> = got.batches[0].iter().map(|l| l.message.as_str()).collect();
    assert_eq!(order, ["a", "b", "c", "d"]);
}

#[test]
fn queue_drops_oldest_beyond_its_bound_and_counts() {
    let mut q = Queue::new(100);
    for t in 0..15 {
        q.push(line(t, 10));
    }
    assert_eq!((q.len(), q.bytes(), q.take_dropped()), (10, 100, 5));
    assert_eq!(q.take_dropped(), 0);
    let taken = q.take();
    assert_eq!(taken.first().map(|l| l.timestamp), Some(5));
    assert!(q.is_empty());
    // Requeued lines go before newer ones; the oldest are dropped first.
    q.push(line(100, 10));
    q.requeue(taken);
    assert_eq!((q.len(), q.take_dropped()), (10, 1));
    let order: Vec<i64> = q.take().iter().map(|l| l.timestamp).collect();
    assert_eq!(order, [6, 7, 8, 9, 10, 11, 12, 13, 14, 100]);
}

#[test]
fn long_lines_are_cut_on_a_character_boundary() {
    let s = "é".repeat(MAX_EVENT_BYTES); // 2 bytes each
    let c = cut(s);
    assert!(c.len() <= MAX_EVENT_BYTES && c.len() >= MAX_EVENT_BYTES - 1);
    assert_eq!(cut("short".into()), "short");
}

#[test]
fn stream_is_never_a_release() {
    assert_eq!(stream_name("i-0abc"), "i-0abc/~agent");
    assert!(AGENT_MARKER.parse::<skiff_release::Tag>().is_err());
}

#[test]
fn the_senders_own_stack_is_not_shipped() {
    for (target, want) in [
        ("skiff_agent::supervise", true),
        ("agent", true),
        ("aws_smithy_runtime::client", false),
        ("aws_config::imds", false),
        ("hyper_util::client", false),
    ] {
        assert_eq!(sent(target), want, "{target}");
    }
}

#[test]
fn the_writer_copies_each_line_and_keeps_stderr() {
    let q = shared_queue();
    {
        let mut w = TeeWriter {
            queue: Some(q.clone()),
            copy: Vec::new(),
        };
        w.write_all(b"{\"msg\":\"one\"}\n").expect("write");
    }
    let lines = q.lock().expect("lock").take();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].message, "{\"msg\":\"one\"}");
}
