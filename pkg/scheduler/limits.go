package scheduler

import (
	"errors"
	"fmt"
)

// Limits on what clients may make the scheduler keep or do. Every number
// a request carries was chosen by whoever sent it: state grows only to
// these bounds, and no work under the lock grows with such a number rather
// than with what is actually stored (finding 3 and 8 of issue 11: a task
// status walked 2^62 pieces under the lock; 100k fake peers took 163 MB;
// each registration walked every peer).
const (
	// DefaultMaxPeers bounds the peers known at once (Options.MaxPeers).
	DefaultMaxPeers = 100_000
	// DefaultMaxTasks bounds the tasks known at once (Options.MaxTasks).
	DefaultMaxTasks = 1 << 18
	// maxSeeds bounds the seed peers: every registration that queues work
	// picks one by rendezvous over all of them.
	maxSeeds = 1024
	// maxTasksPerPeer bounds the tasks one peer ID takes part in: a node
	// caching more blobs than this is told no.
	maxTasksPerPeer = 1 << 15
	// maxPiecesPerCall bounds the piece numbers of one Schedule or
	// ReportPieces call; peers ask for as many as they have free slots.
	maxPiecesPerCall = 1024
	// maxTasksPerCall bounds the tasks of one Preheat or TaskStatus call:
	// an image's blobs over all its platforms are a few hundred.
	maxTasksPerCall = 4096
	// maxHeldPieces bounds the pieces of one full announce, over all its tasks.
	maxHeldPieces = 1 << 20
	// maxUnsizedPieces bounds the pieces tracked of a task whose size
	// nobody said yet (asked for after a scheduler restart): the first
	// report or registration sizes it.
	maxUnsizedPieces = 1024
	// maxBadParents bounds the parents one requester refuses per task.
	maxBadParents = 256
	// maxOffersPerPiece bounds the offers of one piece remembered until the
	// requester reports it; beyond, an offer lapses after offerTTL.
	maxOffersPerPiece = 1024
	// maxRankCandidates bounds the holders of a piece looked at per
	// assignment: a random sample (map order) of a popular piece's holders
	// is as good a choice as all of them, and costs a bounded time.
	maxRankCandidates = 64
	// maxRangeCandidates bounds the holders of a lazy task looked at per
	// ScheduleRange; maxSegments the segments of one answer (the rest of
	// the range goes to the origin in one).
	maxRangeCandidates = 64
	maxSegments        = 256
)

// ErrLimit is a request the scheduler refuses because it would grow its
// state past a limit.
var ErrLimit = errors.New("scheduler limit reached")

// AdmitPeer reports whether a peer may announce: a peer not known yet is
// refused when the scheduler knows MaxPeers peers (or the seed limit).
func (s *Scheduler) AdmitPeer(p Peer) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.peers[p.ID]
	if old == nil && len(s.peers) >= s.o.MaxPeers {
		return fmt.Errorf("%w: %d peers", ErrLimit, len(s.peers))
	}
	if p.Seed && (old == nil || !old.Seed) && len(s.seeds) >= maxSeeds {
		return fmt.Errorf("%w: %d seed peers", ErrLimit, len(s.seeds))
	}
	return nil
}

// AdmitTask reports whether a peer may take part in a task: a task not
// known yet is refused when the scheduler knows MaxTasks tasks, and a peer
// may take part in at most maxTasksPerPeer.
func (s *Scheduler) AdmitTask(peerID, taskID string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tasks[taskID]
	if t == nil && len(s.tasks) >= s.o.MaxTasks {
		return fmt.Errorf("%w: %d tasks", ErrLimit, len(s.tasks))
	}
	if t != nil && t.members[peerID] {
		return nil
	}
	if n := len(s.peerTasks[peerID]); n >= maxTasksPerPeer {
		return fmt.Errorf("%w: peer %s takes part in %d tasks", ErrLimit, peerID, n)
	}
	return nil
}
