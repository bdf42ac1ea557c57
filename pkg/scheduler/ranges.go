package scheduler

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/starling-dev/starling/pkg/byterange"
	"github.com/starling-dev/starling/pkg/piece"
)

// Byte ranges: how lazy readers share a blob without moving whole pieces.
//
// A lazily mounted layer reads chunks, a few KiB to a few MiB each, at
// offsets only its TOC knows. Moving whole pieces for them costs the
// origin link bytes nobody asked for and makes every read wait for a
// piece, so lazy readers ask for the exact range they need: the parts some
// live peer holds come from that peer, the parts nobody holds are fetched
// from the origin by the requester (which claims them), and a part another
// peer is fetching from the origin right now comes from that peer as it
// arrives: its upload server streams a claimed range while it is being
// written. So concurrent readers of the same bytes cost the origin one
// request, and none of them waits for another's fetch to end first.
//
// Held ranges are what the peer's own reader verified against the
// layer's chunk digests; every receiver verifies again against its own
// TOC (bytes streamed from a fetch in flight are not verified by anyone
// yet), so a peer announcing or streaming bytes it should not costs a
// refetch, never a wrong read.

// Range is a byte range of a task.
type Range struct {
	Off, Len int64
}

// Segment is one part of an asked range and where to get it.
type Segment struct {
	Range
	// Parents hold the whole segment, best first.
	Parents []Peer
	// BackToSource: the requester fetches it from the origin (it now
	// holds the claim on it).
	BackToSource bool
}

// RangeRequest asks where to get a byte range of a task.
type RangeRequest struct {
	PeerID, TaskID string
	// Length is the task's length.
	Length int64
	Range
}

const (
	// maxSpansPerPeer bounds what one peer may have the scheduler keep
	// per task (adjacent ranges merge, so a reader's spans are few).
	maxSpansPerPeer = 1 << 14
	// maxRangeClaims bounds the claims of one task.
	maxRangeClaims = 1 << 12
)

// ErrRangeInvalid is a range outside its task, or of a task whose length
// the requester and the scheduler disagree on.
var ErrRangeInvalid = errors.New("invalid range")

type rangeClaim struct {
	peer     string
	off, end int64
	// deadline is when the claim is forgotten, its fetch presumed dead.
	deadline time.Time
}

// rangeState is a task's byte ranges: who holds what outside whole
// pieces, and who is fetching what from the origin.
type rangeState struct {
	held   map[string]*byterange.Set
	claims []rangeClaim
}

// hold records that peer holds rg (clipped to the task's length when known).
func (r *rangeState) hold(peer string, rg Range, length int64) {
	off, end := rg.Off, rg.Off+rg.Len
	if length > 0 {
		end = min(end, length)
	}
	if off < 0 || off >= end {
		return
	}
	if r.held == nil {
		r.held = map[string]*byterange.Set{}
	}
	s := r.held[peer]
	if s == nil {
		s = &byterange.Set{}
		r.held[peer] = s
	}
	if len(*s) >= maxSpansPerPeer {
		return
	}
	s.Add(off, end)
	// The peer's claims on what it now holds are done (its reader
	// verifies chunk by chunk, so a claim ends when its last chunk does).
	out := r.claims[:0]
	for _, c := range r.claims {
		if c.peer != peer || !s.Covers(c.off, c.end) {
			out = append(out, c)
		}
	}
	clear(r.claims[len(out):])
	r.claims = out
}

// release drops peer's claims overlapping [off, end).
func (r *rangeState) release(peer string, off, end int64) {
	out := r.claims[:0]
	for _, c := range r.claims {
		if c.peer != peer || c.off >= end || off >= c.end {
			out = append(out, c)
		}
	}
	clear(r.claims[len(out):])
	r.claims = out
}

func (r *rangeState) dropHeld(peer string) {
	delete(r.held, peer)
}

func (r *rangeState) forget(peer string) {
	delete(r.held, peer)
	r.release(peer, 0, 1<<62)
}

func (r *rangeState) prune(now time.Time) {
	out := r.claims[:0]
	for _, c := range r.claims {
		if now.Before(c.deadline) {
			out = append(out, c)
		}
	}
	clear(r.claims[len(out):])
	r.claims = out
}

// ScheduleRange splits the asked range into segments: held by live peers
// (with those peers), being fetched from the origin by another live peer
// (with that peer, which streams it as it arrives), or nobody's (to fetch
// from the origin, now claimed for the requester).
func (s *Scheduler) ScheduleRange(_ context.Context, req RangeRequest) ([]Segment, error) {
	if req.Len <= 0 || req.Off < 0 || req.Length <= 0 || req.Length > piece.MaxLength || req.Off+req.Len > req.Length || req.Off+req.Len < req.Off {
		return nil, fmt.Errorf("%w: %d+%d of a %d-byte task", ErrRangeInvalid, req.Off, req.Len, req.Length)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// The length is not recorded here: the first registration fixes it
	// together with the piece size.
	t := s.task(req.TaskID, 0, 0)
	if t.length != 0 && t.length != req.Length {
		return nil, fmt.Errorf("%w: task %s has %d bytes, the requester says %d", ErrRangeInvalid, req.TaskID, t.length, req.Length)
	}
	s.joinLocked(t, req.PeerID)
	return s.segmentsLocked(t, req, s.o.Now()), nil
}

// segmentsLocked computes the answer for req and claims its origin parts
// for the requester.
func (s *Scheduler) segmentsLocked(t *taskState, req RangeRequest, now time.Time) []Segment {
	t.rng.prune(now)
	type holder struct {
		id    string
		spans byterange.Set
	}
	// Candidates: live peers, not the requester, not refused by it, that
	// hold something of the task (ranges or pieces); of a popular task, a
	// random sample (map order) of maxRangeCandidates.
	var hs []holder
	var pieceHolders []string
	for id, sp := range t.rng.held {
		if len(hs) >= maxRangeCandidates {
			break
		}
		if id != req.PeerID && !t.bad[req.PeerID][id] && s.alive(id) && len(*sp) > 0 {
			hs = append(hs, holder{id, *sp})
		}
	}
	for id, n := range t.held {
		if len(pieceHolders) >= maxRangeCandidates {
			break
		}
		if n > 0 && id != req.PeerID && !t.bad[req.PeerID][id] && s.alive(id) {
			pieceHolders = append(pieceHolders, id)
		}
	}
	end := req.Off + req.Len
	// coverEnd: how far from pos peer id holds the task contiguously.
	coverEnd := func(id string, sp byterange.Set, pos int64) int64 {
		for {
			e := pos
			if sp != nil {
				e = sp.CoverEnd(e)
			}
			if t.pieceSize > 0 {
				if p, ok := t.pieces[int(e/t.pieceSize)]; ok && p.holders[id] {
					e = min((e/t.pieceSize+1)*t.pieceSize, t.length)
				}
			}
			if e == pos || e >= end {
				return e
			}
			pos = e
		}
	}
	spansOf := map[string]byterange.Set{}
	for _, h := range hs {
		spansOf[h.id] = h.spans
	}
	ids := make([]string, 0, len(hs)+len(pieceHolders))
	for _, h := range hs {
		ids = append(ids, h.id)
	}
	for _, id := range pieceHolders {
		if _, ok := spansOf[id]; !ok {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	// nextCovered: the first byte after pos some candidate holds.
	nextCovered := func(pos int64) int64 {
		next := end
		for _, id := range ids {
			if sp := spansOf[id]; sp != nil {
				if n := sp.NextStart(pos); n >= 0 && n < next {
					next = n
				}
			}
		}
		if t.pieceSize > 0 && len(pieceHolders) > 0 {
			if (next-pos)/t.pieceSize > int64(len(t.pieces)) {
				// Fewer pieces known than in the range: walk those.
				for n, p := range t.pieces {
					if o := int64(n) * t.pieceSize; o > pos && o < next && len(p.holders) > 0 {
						next = o
					}
				}
				return next
			}
			for n := pos/t.pieceSize + 1; n*t.pieceSize < next; n++ {
				if p, ok := t.pieces[int(n)]; ok && len(p.holders) > 0 {
					next = n * t.pieceSize
					break
				}
			}
		}
		return next
	}
	var segs []Segment
	var origin []Range
	push := func(seg Segment) {
		if k := len(segs) - 1; k >= 0 && segs[k].BackToSource && seg.BackToSource && segs[k].Off+segs[k].Len == seg.Off {
			segs[k].Len += seg.Len
			return
		}
		segs = append(segs, seg)
	}
	pos := req.Off
	for pos < end {
		if len(segs) >= maxSegments {
			// A range cut this fine is not worth more of the lock: the
			// rest comes from the origin.
			push(Segment{Range: Range{pos, end - pos}, BackToSource: true})
			origin = append(origin, Range{pos, end - pos})
			break
		}
		// The longest run some candidates hold from pos, and every
		// candidate holding all of it.
		best := pos
		for _, id := range ids {
			best = max(best, min(coverEnd(id, spansOf[id], pos), end))
		}
		if best > pos {
			var parents []string
			for _, id := range ids {
				if min(coverEnd(id, spansOf[id], pos), end) >= best {
					parents = append(parents, id)
				}
			}
			push(Segment{Range: Range{pos, best - pos}, Parents: s.rankRange(parents, req.PeerID)})
			pos = best
			continue
		}
		stop := nextCovered(pos)
		// Another live peer fetching pos from the origin now streams it.
		var claim *rangeClaim
		for i := range t.rng.claims {
			c := &t.rng.claims[i]
			if c.off <= pos && pos < c.end && c.peer != req.PeerID && s.alive(c.peer) && !t.bad[req.PeerID][c.peer] {
				if claim == nil || c.end > claim.end {
					claim = c
				}
			}
		}
		if claim != nil {
			e := min(claim.end, stop)
			push(Segment{Range: Range{pos, e - pos}, Parents: s.rankRange([]string{claim.peer}, req.PeerID)})
			pos = e
			continue
		}
		// Up to the next claim of another peer, which streams from there.
		for _, c := range t.rng.claims {
			if c.off > pos && c.off < stop && c.peer != req.PeerID && s.alive(c.peer) && !t.bad[req.PeerID][c.peer] {
				stop = c.off
			}
		}
		push(Segment{Range: Range{pos, stop - pos}, BackToSource: true})
		origin = append(origin, Range{pos, stop - pos})
		pos = stop
	}
	for _, o := range origin {
		if len(t.rng.claims) >= maxRangeClaims {
			break
		}
		t.rng.claims = append(t.rng.claims, rangeClaim{peer: req.PeerID, off: o.Off, end: o.Off + o.Len,
			deadline: now.Add(s.o.FetchTTL)})
	}
	return segs
}

// rankRange orders the holders of a segment: most free upload slots, then
// nearest to the requester, at most MaxParents. A full parent stays in
// the list, last: it may have a slot by the time it is asked, and the
// requester falls back to the origin if not.
func (s *Scheduler) rankRange(ids []string, requester string) []Peer {
	req := s.peers[requester]
	type cand struct {
		Peer
		free, near int
	}
	cs := make([]cand, 0, len(ids))
	for _, id := range ids {
		ps := s.peers[id]
		if ps == nil {
			continue
		}
		c := cand{Peer: ps.Peer, free: ps.Capacity - ps.Load}
		if req != nil && req.Zone != "" && req.Zone == ps.Zone {
			c.near++
			if req.Rack != "" && req.Rack == ps.Rack {
				c.near++
			}
		}
		cs = append(cs, c)
	}
	sort.SliceStable(cs, func(i, j int) bool {
		a, b := cs[i], cs[j]
		if (a.free > 0) != (b.free > 0) {
			return a.free > 0
		}
		if a.near != b.near {
			return a.near > b.near
		}
		return a.free > b.free
	})
	if len(cs) > s.o.MaxParents {
		cs = cs[:s.o.MaxParents]
	}
	out := make([]Peer, len(cs))
	for i, c := range cs {
		out[i] = c.Peer
	}
	return out
}

// ReportRanges records ranges a peer holds and releases claims on ranges
// it could not fetch, waking the readers that wait on them.
func (s *Scheduler) ReportRanges(peerID, taskID string, length int64, held, released []Range) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.task(taskID, 0, 0)
	if length <= 0 || length > piece.MaxLength || (t.length != 0 && t.length != length) {
		return fmt.Errorf("%w: task %s has %d bytes, the peer says %d", ErrRangeInvalid, taskID, t.length, length)
	}
	s.joinLocked(t, peerID)
	for _, r := range held {
		t.rng.hold(peerID, r, length)
	}
	for _, r := range released {
		t.rng.release(peerID, r.Off, r.Off+r.Len)
	}
	return nil
}
