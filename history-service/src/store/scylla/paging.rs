//! The walk of one message page over seq buckets, as a state machine without I/O: it names
//! the next query and is told what came back. [`super::ScyllaStore`] runs the queries; the
//! tests below run it against a table in memory.
//!
//! Messages live in partitions of [`BUCKET_SIZE`] seqs, and seqs also number edits, pins and
//! receipts, so many buckets hold no message at all. The walk takes bucket numbers from the
//! index of non-empty buckets (`message_buckets`), [`BUCKETS_PER_QUERY`] at a time, and reads
//! each bucket until the page is full or the bucket has no more rows: a row that is not a
//! message (a fragment) costs another read in the same bucket, never the rest of the bucket.

use std::collections::VecDeque;

use super::BUCKET_SIZE;
use crate::store::Page;

/// Bucket numbers asked of the index at once: a page of 50 newest-first rows spans one or
/// two buckets; eight covers sparse rooms without a second index read.
pub const BUCKETS_PER_QUERY: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Seqs below the cursor, highest first (`Page::Before`).
    NewestFirst,
    /// Seqs above the cursor, lowest first (`Page::After`).
    OldestFirst,
}

/// The next query a walk needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Query {
    /// Up to `limit` numbers of non-empty buckets, from bucket `from` (inclusive) on in the
    /// walk's direction.
    Buckets { from: u64, limit: usize },
    /// Up to `limit` rows of `bucket` strictly beyond `cursor` in the walk's direction.
    Rows {
        bucket: u64,
        cursor: u64,
        limit: usize,
    },
}

#[derive(Debug)]
pub struct PageWalk {
    direction: Direction,
    /// Messages the page still wants.
    wanted: usize,
    /// The page's exclusive bound: every bucket is entered with this cursor.
    bound: u64,
    /// Non-empty buckets known and not read yet, in walk order.
    buckets: VecDeque<u64>,
    /// Where the next index read starts; None once the index has no more.
    next_index: Option<u64>,
    /// The bucket being read, the cursor in it and the limit of the read in flight.
    reading: Option<(u64, u64, usize)>,
}

impl PageWalk {
    pub fn new(page: Page) -> Self {
        let (direction, bound, limit, first) = match page {
            // Seq 0 is never stored, so nothing lies below 1.
            Page::Before { before, limit } => {
                let bound = before.unwrap_or(u64::MAX);
                let first = bound.checked_sub(1).filter(|&s| s >= 1);
                (Direction::NewestFirst, bound, limit, first)
            }
            Page::After { after, limit } => {
                (Direction::OldestFirst, after, limit, after.checked_add(1))
            }
        };
        Self {
            direction,
            wanted: limit as usize,
            bound,
            buckets: VecDeque::new(),
            next_index: first.map(|seq| seq / BUCKET_SIZE),
            reading: None,
        }
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// The next query, or None when the page is complete.
    pub fn next_query(&mut self) -> Option<Query> {
        if self.wanted == 0 {
            return None;
        }
        if let Some((bucket, cursor, _)) = self.reading {
            self.reading = Some((bucket, cursor, self.wanted));
            return Some(Query::Rows {
                bucket,
                cursor,
                limit: self.wanted,
            });
        }
        if let Some(bucket) = self.buckets.pop_front() {
            self.reading = Some((bucket, self.bound, self.wanted));
            return Some(Query::Rows {
                bucket,
                cursor: self.bound,
                limit: self.wanted,
            });
        }
        self.next_index.map(|from| Query::Buckets {
            from,
            limit: BUCKETS_PER_QUERY,
        })
    }

    /// The answer to a [`Query::Buckets`]: the bucket numbers found, in walk order.
    pub fn buckets_found(&mut self, found: &[u64]) {
        self.buckets.extend(found);
        self.next_index = match (found.last(), found.len() < BUCKETS_PER_QUERY) {
            (Some(&last), false) => match self.direction {
                Direction::NewestFirst => last.checked_sub(1),
                Direction::OldestFirst => last.checked_add(1),
            },
            // Fewer than asked: the index has nothing further.
            _ => None,
        };
    }

    /// The answer to a [`Query::Rows`]: how many rows came back, the seq of the last one, and
    /// how many of them were messages (the page keeps those).
    pub fn rows_read(&mut self, fetched: usize, last_seq: Option<u64>, kept: usize) {
        let Some((bucket, _, limit)) = self.reading else {
            return;
        };
        self.wanted = self.wanted.saturating_sub(kept);
        self.reading = match last_seq {
            // A full read may have left rows behind: continue after the last one.
            Some(last) if fetched >= limit => Some((bucket, last, limit)),
            // A short read is the end of the bucket.
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// One room's message table in memory: seq → whether the row is a message (false: a
    /// fragment, which a page skips). Counts the queries a walk makes.
    struct Table {
        rows: BTreeMap<u64, bool>,
        index_reads: usize,
        row_reads: usize,
    }

    impl Table {
        fn new(rows: impl IntoIterator<Item = (u64, bool)>) -> Self {
            Self {
                rows: rows.into_iter().collect(),
                index_reads: 0,
                row_reads: 0,
            }
        }

        fn messages(seqs: impl IntoIterator<Item = u64>) -> Self {
            Self::new(seqs.into_iter().map(|s| (s, true)))
        }

        /// Runs the page the way the store does; returns the seqs it kept.
        fn page(&mut self, page: Page) -> Vec<u64> {
            let mut walk = PageWalk::new(page);
            let newest = walk.direction() == Direction::NewestFirst;
            let mut out = Vec::new();
            while let Some(q) = walk.next_query() {
                match q {
                    Query::Buckets { from, limit } => {
                        self.index_reads += 1;
                        let all: BTreeSet<u64> =
                            self.rows.keys().map(|s| s / BUCKET_SIZE).collect();
                        let found: Vec<u64> = if newest {
                            all.range(..=from).rev().take(limit).copied().collect()
                        } else {
                            all.range(from..).take(limit).copied().collect()
                        };
                        walk.buckets_found(&found);
                    }
                    Query::Rows {
                        bucket,
                        cursor,
                        limit,
                    } => {
                        self.row_reads += 1;
                        let in_bucket = self
                            .rows
                            .iter()
                            .filter(|(s, _)| **s / BUCKET_SIZE == bucket)
                            .map(|(s, m)| (*s, *m));
                        let rows: Vec<(u64, bool)> = if newest {
                            in_bucket
                                .rev()
                                .filter(|(s, _)| *s < cursor)
                                .take(limit)
                                .collect()
                        } else {
                            in_bucket.filter(|(s, _)| *s > cursor).take(limit).collect()
                        };
                        let kept: Vec<u64> =
                            rows.iter().filter(|(_, m)| *m).map(|(s, _)| *s).collect();
                        walk.rows_read(rows.len(), rows.last().map(|(s, _)| *s), kept.len());
                        out.extend(kept);
                    }
                }
            }
            out
        }

        /// What the page must return: the stored messages in order, `limit` of them.
        fn expected(&self, page: Page) -> Vec<u64> {
            let messages = self.rows.iter().filter(|(_, m)| **m).map(|(s, _)| *s);
            match page {
                Page::Before { before, limit } => messages
                    .rev()
                    .filter(|s| before.is_none_or(|b| *s < b))
                    .take(limit as usize)
                    .collect(),
                Page::After { after, limit } => messages
                    .filter(|s| *s > after)
                    .take(limit as usize)
                    .collect(),
            }
        }
    }

    fn before(before: Option<u64>, limit: u32) -> Page {
        Page::Before { before, limit }
    }

    fn after(after: u64, limit: u32) -> Page {
        Page::After { after, limit }
    }

    #[test]
    fn a_filtered_row_does_not_end_its_bucket() {
        // A fragment in the middle of a bucket: the page reads on in the same bucket instead
        // of jumping to the next one (which would skip 5..1 here).
        let mut t = Table::new((1..=10).map(|s| (s, s != 8)));
        assert_eq!(t.page(before(None, 5)), vec![10, 9, 7, 6, 5]);
        assert_eq!(t.page(after(2, 6)), vec![3, 4, 5, 6, 7, 9]);
    }

    #[test]
    fn empty_buckets_cost_nothing() {
        // Two messages 900 buckets apart (everything between numbered joins and pins): one
        // index read, one row read per non-empty bucket, whatever lies between.
        let mut t = Table::messages([5, 900_005]);
        assert_eq!(t.page(before(None, 10)), vec![900_005, 5]);
        assert_eq!((t.index_reads, t.row_reads), (1, 2));
        let mut t = Table::messages([5, 900_005]);
        assert_eq!(t.page(after(0, 10)), vec![5, 900_005]);
        assert_eq!((t.index_reads, t.row_reads), (1, 2));
    }

    #[test]
    fn more_buckets_than_one_index_read() {
        let seqs: Vec<u64> = (0..20).map(|b| b * 3 * BUCKET_SIZE + 7).collect();
        let mut t = Table::messages(seqs.clone());
        let mut newest = seqs.clone();
        newest.reverse();
        assert_eq!(t.page(before(None, 100)), newest);
        assert_eq!(t.index_reads, 3, "8 + 8 + 4 buckets");
        assert_eq!(t.page(after(0, 100)), seqs);
    }

    #[test]
    fn bounds_and_empty_pages() {
        let mut t = Table::messages([1, 2, 999, 1000, 1001]);
        assert_eq!(t.page(before(Some(1000), 2)), vec![999, 2]);
        assert_eq!(t.page(before(Some(1), 5)), Vec::<u64>::new());
        assert_eq!(t.page(before(Some(0), 5)), Vec::<u64>::new());
        assert_eq!(t.page(before(None, 0)), Vec::<u64>::new());
        assert_eq!(t.page(after(999, 1)), vec![1000]);
        assert_eq!(t.page(after(u64::MAX, 5)), Vec::<u64>::new());
        assert_eq!(t.page(before(Some(u64::MAX), 1)), vec![1001]);
        let mut empty = Table::messages([]);
        assert_eq!(empty.page(before(None, 5)), Vec::<u64>::new());
        assert_eq!((empty.index_reads, empty.row_reads), (1, 0));
    }

    #[test]
    fn pages_match_a_plain_scan() {
        // Pseudo-random tables (fixed seed): sparse and dense stretches, fragments, and every
        // kind of cursor; each page must be exactly what a scan of the table gives.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..200 {
            let mut rows = Vec::new();
            let mut seq = 1 + next(3000);
            for _ in 0..next(60) {
                rows.push((seq, next(7) != 0));
                seq += 1 + if next(4) == 0 { next(20_000) } else { next(5) };
            }
            let mut t = Table::new(rows);
            let limit = 1 + next(30) as u32;
            let cursor = next(seq + 10);
            for page in [
                before(None, limit),
                before(Some(cursor), limit),
                after(cursor, limit),
                after(0, limit),
            ] {
                assert_eq!(t.page(page), t.expected(page), "{page:?} over {:?}", t.rows);
            }
        }
    }
}
