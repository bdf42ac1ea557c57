package peer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/piece"
	"github.com/starling-dev/starling/pkg/storage"
)

// waitBackoff is how long a piece that another peer is fetching from the
// origin rests before the scheduler is asked again: about the time a piece
// takes on a fast link, so a waiting peer starts soon after it appears.
const waitBackoff = 100 * time.Millisecond

// avoidFor rests a parent that failed (dead, slow, full) for this task.
const avoidFor = 10 * time.Second

// maxParentRounds is how often a piece is tried from parents before it is
// fetched from the origin instead.
const maxParentRounds = 3

// schedOutageGrace is how long after its last answer a task keeps waiting
// for a scheduler that stopped answering before it goes to the origin: a
// scheduler restarting mid-transfer is back within a heartbeat or two, and
// meanwhile every peer sending its next pieces to the origin costs the
// origin what the peers hold between them.
const schedOutageGrace = 5 * time.Second

// schedRetry is how often the scheduler is asked again during an outage.
const schedRetry = 250 * time.Millisecond

// errRetry marks a piece to be scheduled again (its parents failed).
var errRetry = errors.New("retry")

// task is the download state of one task, shared by every Download of it.
type task struct {
	p      *Peer
	id     string
	req    Request
	src    Source
	st     *storage.Task
	length int64
	psize  int64
	count  int

	mu     sync.Mutex
	refs   int
	have   []bool
	urgent map[int]bool
	wanted map[int]bool // wanted in the background, in order
	all    bool
	order  []int // background order: a random permutation
	// fronts are the next pieces of the streaming readers: the pieces just
	// ahead of them are fetched first (see pendingLocked).
	fronts     map[*reader]int
	seen       []bool      // pendingLocked's scratch
	schedOK    time.Time   // the scheduler last answered a schedule
	waits      map[int]int // times in a row the scheduler said to wait
	inflight   map[int]bool
	failed     map[int]error
	waitUntil  map[int]time.Time
	rounds     map[int]int
	avoid      map[string]time.Time
	bad        map[string]bool
	parentLoad map[string]int
	parentOf   map[int]string
	fatal      error
	done       bool
	running    bool
	registered bool
	changed    chan struct{}
	kick       chan struct{}
}

func newTask(p *Peer, r Request, src Source, st *storage.Task) *task {
	t := &task{p: p, id: r.TaskID, req: r, src: src, st: st, length: st.Length(), psize: st.PieceSize(),
		urgent: map[int]bool{}, wanted: map[int]bool{}, inflight: map[int]bool{}, failed: map[int]error{},
		waitUntil: map[int]time.Time{}, rounds: map[int]int{}, avoid: map[string]time.Time{},
		bad: map[string]bool{}, parentLoad: map[string]int{}, parentOf: map[int]string{},
		fronts: map[*reader]int{}, waits: map[int]int{}, changed: make(chan struct{}), kick: make(chan struct{}, 1)}
	t.count = piece.Count(t.length, t.psize)
	// Peers that fetch a task at the same time fetch its pieces in
	// different orders, so that they soon hold different pieces and can
	// trade them, instead of all waiting on whoever holds the next one.
	t.order = rand.Perm(t.count)
	t.seen = make([]bool, t.count)
	t.have = make([]bool, t.count)
	for n := range st.Pieces() {
		if n >= 0 && n < t.count {
			t.have[n] = true
		}
	}
	t.done = st.Done()
	return t
}

// broadcastLocked wakes everyone waiting for a change.
func (t *task) broadcastLocked() {
	close(t.changed)
	t.changed = make(chan struct{})
}

func (t *task) wake() {
	select {
	case t.kick <- struct{}{}:
	default:
	}
}

// wantLocked marks pieces first..last as needed now and starts the loop.
func (t *task) wantLocked(first, last int) {
	for n := first; n <= last; n++ {
		if !t.have[n] {
			t.urgent[n] = true
			delete(t.failed, n)
		}
	}
	t.startLocked()
}

func (t *task) startLocked() {
	if !t.running && !t.done && t.fatal == nil {
		t.running = true
		t.p.wg.Add(1)
		go func() { defer t.p.wg.Done(); t.run(); t.p.release(t) }()
	}
	t.wake()
}

func (t *task) allHaveLocked() bool {
	for _, h := range t.have {
		if !h {
			return false
		}
	}
	return true
}

// window is how many pieces ahead of a streaming reader come first.
func (t *task) window() int { return 2 * t.p.o.Concurrency }

// frontsLocked lists, in order and once each, where the background fetch
// starts: the streaming readers' next pieces, and for a seed its first
// missing piece.
func (t *task) frontsLocked() []int {
	var fs []int
	for _, f := range t.fronts {
		fs = append(fs, f)
	}
	if t.p.o.Seed {
		for n, h := range t.have {
			if !h {
				fs = append(fs, n)
				break
			}
		}
	}
	sort.Ints(fs)
	out := fs[:0]
	for i, f := range fs {
		if i == 0 || f != fs[i-1] {
			out = append(out, f)
		}
	}
	return out
}

// pendingLocked lists the pieces to ask for now, most wanted first: what a
// reader waits for, then the wanted rest. A streaming reader's next window
// of pieces comes first, in this peer's own random order so that peers
// reading the same blob fetch different pieces at once and trade them,
// then the pieces after the window in order: the head of the blob arrives
// first and the reader writes as it goes. A seed, the one that fetches
// for everyone from the origin, goes in order from its first missing piece,
// which is where the others' readers wait. Without a reader (prefetch,
// resume) the order is random, spread over the task.
func (t *task) pendingLocked(now time.Time) (pending []int, waiting bool, wake time.Time) {
	clear(t.seen)
	consider := func(n int) {
		if t.seen[n] {
			return
		}
		t.seen[n] = true
		if t.have[n] || t.inflight[n] || t.failed[n] != nil {
			return
		}
		if w, ok := t.waitUntil[n]; ok && now.Before(w) {
			waiting = true
			if wake.IsZero() || w.Before(wake) {
				wake = w
			}
			return
		}
		pending = append(pending, n)
	}
	var us []int
	for n := range t.urgent {
		us = append(us, n)
	}
	sort.Ints(us)
	for _, n := range us {
		consider(n)
	}
	if t.all || len(t.wanted) > 0 {
		want := func(n int) bool { return t.all || t.wanted[n] }
		fronts := t.frontsLocked()
		w := t.window()
		if t.p.o.Seed && len(t.fronts) == 0 {
			w = 0
		}
		for _, f := range fronts {
			if w == 0 {
				break
			}
			for _, n := range t.order {
				if n >= f && n < f+w && want(n) {
					consider(n)
				}
			}
		}
		for _, f := range fronts {
			for n := f + w; n < t.count; n++ {
				if want(n) {
					consider(n)
				}
			}
		}
		for _, n := range t.order {
			if want(n) {
				consider(n)
			}
		}
	}
	return pending, waiting, wake
}

// run is the task's download loop: it keeps up to Concurrency pieces in
// flight and ends when nothing wanted is missing.
func (t *task) run() {
	for {
		t.mu.Lock()
		if t.fatal != nil || t.done {
			t.running = false
			t.mu.Unlock()
			return
		}
		now := time.Now()
		pending, waiting, wakeAt := t.pendingLocked(now)
		if t.allHaveLocked() && len(t.inflight) == 0 {
			t.mu.Unlock()
			t.finish()
			t.mu.Lock()
			t.running = false
			t.mu.Unlock()
			return
		}
		if len(pending) == 0 && !waiting && len(t.inflight) == 0 {
			t.running = false
			t.mu.Unlock()
			return
		}
		free := t.p.o.Concurrency - len(t.inflight)
		var batch []int
		if free > 0 && len(pending) > 0 {
			batch = pending[:min(free, len(pending))]
			for _, n := range batch {
				t.inflight[n] = true
			}
		}
		t.mu.Unlock()
		if len(batch) > 0 {
			t.dispatch(batch)
			continue
		}
		var timer <-chan time.Time
		if waiting {
			timer = time.After(max(time.Until(wakeAt), time.Millisecond))
		}
		select {
		case <-t.kick:
		case <-timer:
		case <-t.p.ctx.Done():
			t.mu.Lock()
			t.running = false
			t.mu.Unlock()
			return
		}
	}
}

// finish verifies the whole task once every piece is there.
func (t *task) finish() {
	err := t.st.Finish()
	t.mu.Lock()
	defer t.mu.Unlock()
	if err != nil {
		t.fatal = fmt.Errorf("task %s (%s): %w", t.id, t.req.URL, err)
		parents := map[string]bool{}
		for _, par := range t.parentOf {
			parents[par] = true
		}
		t.p.log.Error("task failed verification, discarded", "task", t.id, "url", t.req.URL, "err", err)
		for par := range parents {
			go t.reportBad(par)
		}
	} else if !t.done {
		t.done = true
		t.p.m.completed.Inc()
		removeRequest(t.p.o.Root, t.id)
		t.p.log.Debug("task done", "task", t.id, "bytes", t.length)
	}
	t.broadcastLocked()
}

// dispatch asks the scheduler where to get the pieces of batch and starts
// fetching them; without a scheduler every piece comes from the origin.
func (t *task) dispatch(batch []int) {
	c := t.p.sched
	if c == nil {
		for _, n := range batch {
			t.goOrigin(n, "standalone")
		}
		return
	}
	c.mu.Lock()
	up := c.up
	c.mu.Unlock()
	t.mu.Lock()
	// A whole-blob task the scheduler answered a moment ago waits out a
	// short outage (a restart) instead of sending its pieces to the
	// origin; lazy reads have their own fallback and must not wait.
	hold := !t.req.Lazy && !t.schedOK.IsZero() && time.Since(t.schedOK) < schedOutageGrace
	t.mu.Unlock()
	var resp *schedulerpb.ScheduleResponse
	err := errors.New("scheduler marked down")
	if up || hold {
		resp, err = t.schedule(batch)
	}
	now := time.Now()
	if err != nil {
		if up {
			c.setUp(false, err)
		}
		t.mu.Lock()
		hold = !t.req.Lazy && !t.schedOK.IsZero() && now.Sub(t.schedOK) < schedOutageGrace
		if hold {
			for _, n := range batch {
				delete(t.inflight, n)
				t.waitUntil[n] = now.Add(schedRetry)
			}
		}
		t.mu.Unlock()
		if hold {
			return
		}
		for _, n := range batch {
			t.goOrigin(n, "scheduler_unreachable")
		}
		return
	}
	t.mu.Lock()
	t.schedOK = now
	t.mu.Unlock()
	// The answer is checked like any input from the network: only the
	// pieces asked, each once; a digest that is not one means none; at
	// most maxAnsweredParents parents, each with an address.
	asked := make(map[int]bool, len(batch))
	for _, n := range batch {
		asked[n] = true
	}
	got := map[int]bool{}
	for _, a := range resp.GetAssignments() {
		n := int(a.GetPiece())
		if !asked[n] || got[n] {
			continue
		}
		got[n] = true
		digest := a.GetDigest()
		if !validDigest(digest) {
			digest = ""
		}
		answered := a.GetParents()
		if len(answered) > maxAnsweredParents {
			answered = answered[:maxAnsweredParents]
		}
		var parents []*schedulerpb.PeerInfo
		resting := 0
		t.mu.Lock()
		for _, par := range answered {
			if par.GetId() == t.p.id || t.bad[par.GetId()] || !validParent(par) {
				continue
			}
			if now.Before(t.avoid[par.GetId()]) {
				resting++
				continue
			}
			parents = append(parents, par)
		}
		rounds := t.rounds[n]
		t.mu.Unlock()
		switch {
		case len(parents) > 0 && digest != "" && rounds < maxParentRounds:
			t.goParents(n, digest, parents)
		case resting > 0 && rounds < maxParentRounds:
			// Only parents that failed a moment ago (likely dead: the
			// scheduler drops them after its peer TTL) hold it, or the
			// others are busy: ask again shortly rather than have the
			// origin send it again.
			t.mu.Lock()
			delete(t.inflight, n)
			t.rounds[n]++
			t.restLocked(n, now)
			t.mu.Unlock()
		case len(a.GetParents()) > 0:
			// Every parent failed or was refused: the origin has it.
			t.goOrigin(n, "parents_failed")
		case a.GetBackToSource():
			t.goOrigin(n, "scheduled")
		default:
			t.mu.Lock()
			delete(t.inflight, n)
			t.restLocked(n, now)
			t.mu.Unlock()
		}
	}
	for _, n := range batch {
		if !got[n] {
			t.mu.Lock()
			delete(t.inflight, n)
			t.restLocked(n, now)
			t.mu.Unlock()
		}
	}
}

// maxAnsweredParents bounds the parents of one answer that are tried (the
// scheduler sends MaxParents, 4 by default).
const maxAnsweredParents = 16

// validParent reports whether a parent the scheduler named can be asked:
// an ID and an address.
func validParent(par *schedulerpb.PeerInfo) bool {
	return par.GetId() != "" && par.GetUploadPort() > 0 && par.GetUploadPort() <= 65535 && net.ParseIP(par.GetIp()) != nil
}

// validDigest reports whether d is a lowercase hex sha256, as pieces are
// checked against.
func validDigest(d string) bool {
	if len(d) != sha256.Size*2 {
		return false
	}
	for _, c := range d {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// restLocked rests piece n after the scheduler said to wait for it. Every
// ask is a call to the scheduler, which all peers of a task share: pieces
// rest until a common tick, so that one call asks again for all of them,
// and a piece the reader does not need next rests longer the more often
// it had to wait (up to 4 times waitBackoff), since it is needed later.
func (t *task) restLocked(n int, now time.Time) {
	t.waits[n]++
	d := waitBackoff
	if !t.urgent[n] {
		d *= time.Duration(min(1+t.waits[n]/2, 4))
	}
	at := now.Add(d)
	const tick = waitBackoff / 2
	if r := at.Truncate(tick); r.Before(at) {
		at = r.Add(tick)
	}
	t.waitUntil[n] = at
}

func (t *task) schedule(batch []int) (*schedulerpb.ScheduleResponse, error) {
	addr, cl := t.p.sched.Pick(t.id)
	if cl == nil {
		return nil, fmt.Errorf("no client for scheduler %s", addr)
	}
	t.mu.Lock()
	registered := t.registered
	t.mu.Unlock()
	if !registered {
		ctx, cancel := context.WithTimeout(t.p.ctx, callTimeout)
		_, err := cl.RegisterTask(ctx, &schedulerpb.RegisterTaskRequest{PeerId: t.p.id, Task: workOf(t.req),
			Length: t.length, PieceSize: t.psize})
		cancel()
		if err != nil {
			return nil, fmt.Errorf("register task %s with scheduler %s: %w", t.id, addr, err)
		}
		t.mu.Lock()
		t.registered = true
		t.mu.Unlock()
	}
	req := &schedulerpb.ScheduleRequest{PeerId: t.p.id, TaskId: t.id}
	for _, n := range batch {
		req.Pieces = append(req.Pieces, int32(n))
	}
	ctx, cancel := context.WithTimeout(t.p.ctx, callTimeout)
	defer cancel()
	resp, err := cl.Schedule(ctx, req)
	if err != nil {
		t.mu.Lock()
		t.registered = false
		t.mu.Unlock()
		return nil, fmt.Errorf("schedule task %s with scheduler %s: %w", t.id, addr, err)
	}
	return resp, nil
}

func (t *task) goOrigin(n int, reason string) {
	t.p.wg.Add(1)
	go func() {
		defer t.p.wg.Done()
		t.pieceDone(n, t.fromOrigin(n, reason), "")
	}()
}

func (t *task) goParents(n int, digest string, parents []*schedulerpb.PeerInfo) {
	t.p.wg.Add(1)
	go func() {
		defer t.p.wg.Done()
		par, err := t.fromParents(n, digest, parents)
		t.pieceDone(n, err, par)
	}()
}

func (t *task) fromOrigin(n int, reason string) error {
	off, l := piece.Range(n, t.length, t.psize)
	rc, err := t.src.Fetch(t.p.ctx, off, l)
	if err != nil {
		return fmt.Errorf("fetch piece %d of task %s from the origin: %w", n, t.id, err)
	}
	data := make([]byte, l)
	_, err = io.ReadFull(rc, data)
	rc.Close()
	if err != nil {
		return fmt.Errorf("fetch piece %d of task %s from the origin %s: %w", n, t.id, t.req.URL, err)
	}
	sum := sha256.Sum256(data)
	if err := t.st.WritePiece(n, data, hex.EncodeToString(sum[:])); err != nil {
		return fmt.Errorf("store piece %d of task %s: %w", n, t.id, err)
	}
	t.p.log.Debug("piece stored", "task", t.id, "piece", n, "from", "origin")
	t.p.m.pieceBytes.WithLabelValues("origin").Add(float64(l))
	t.p.m.backToSource.WithLabelValues(reason).Inc()
	t.report(n, hex.EncodeToString(sum[:]))
	return nil
}

// fromParents tries the parents in turn, least loaded by us first. A
// parent whose piece does not match the digest the origin fetcher
// registered is never asked again for this task.
func (t *task) fromParents(n int, digest string, parents []*schedulerpb.PeerInfo) (string, error) {
	// The scheduler's order counts recent offers against each parent's
	// free slots; only our own in-flight requests reorder it.
	t.mu.Lock()
	sort.SliceStable(parents, func(i, j int) bool {
		return t.parentLoad[parents[i].GetId()] < t.parentLoad[parents[j].GetId()]
	})
	t.mu.Unlock()
	failed := false
	for _, par := range parents {
		id := par.GetId()
		t.mu.Lock()
		if t.bad[id] {
			t.mu.Unlock()
			continue
		}
		t.parentLoad[id]++
		t.mu.Unlock()
		_, want := piece.Range(n, t.length, t.psize)
		start := time.Now()
		data, err := t.p.fetchPiece(t.p.ctx, par, t.id, n, want)
		took := time.Since(start)
		t.mu.Lock()
		t.parentLoad[id]--
		t.mu.Unlock()
		if errors.Is(err, errBusy) {
			// Full, not broken: ask the next one, and this one again later.
			continue
		}
		if err != nil {
			failed = true
			t.p.log.Debug("piece from parent failed", "task", t.id, "piece", n, "parent", id, "err", err)
			t.mu.Lock()
			t.avoid[id] = time.Now().Add(avoidFor)
			t.mu.Unlock()
			continue
		}
		// The store checks the digest as it writes: hashing here too
		// would cost a second pass over every piece.
		err = t.st.WritePiece(n, data, digest)
		if err != nil && !errors.Is(err, storage.ErrPieceDigest) {
			return "", fmt.Errorf("store piece %d of task %s: %w", n, t.id, err)
		}
		if err != nil {
			failed = true
			t.p.m.badPieces.Inc()
			t.p.log.Warn("parent served a bad piece: not asking it again for this task",
				"task", t.id, "piece", n, "parent", id, "addr", fmt.Sprintf("%s:%d", par.GetIp(), par.GetUploadPort()))
			t.mu.Lock()
			t.bad[id] = true
			t.mu.Unlock()
			go t.reportBad(id)
			continue
		}
		t.p.log.Debug("piece stored", "task", t.id, "piece", n, "from", id, "took", took)
		t.p.m.pieceBytes.WithLabelValues("parent").Add(float64(len(data)))
		t.report(n, digest)
		return id, nil
	}
	if !failed {
		return "", errBusy
	}
	t.mu.Lock()
	t.rounds[n]++
	t.mu.Unlock()
	return "", errRetry
}

func (t *task) report(n int, digest string) {
	c := t.p.sched
	if c == nil {
		return
	}
	addr, cl := c.Pick(t.id)
	if cl == nil {
		return
	}
	ctx, cancel := context.WithTimeout(t.p.ctx, callTimeout)
	defer cancel()
	_, err := cl.ReportPieces(ctx, &schedulerpb.ReportPiecesRequest{PeerId: t.p.id, TaskId: t.id,
		Length: t.length, PieceSize: t.psize, Pieces: []*schedulerpb.PieceDigest{{Number: int32(n), Digest: digest}}})
	if err != nil {
		// The next full announce tells the scheduler instead.
		c.mu.Lock()
		c.synced[addr] = false
		c.mu.Unlock()
		t.p.log.Debug("report piece", "task", t.id, "piece", n, "scheduler", addr, "err", err)
	}
}

func (t *task) reportBad(parent string) {
	c := t.p.sched
	if c == nil {
		return
	}
	_, cl := c.Pick(t.id)
	if cl == nil {
		return
	}
	ctx, cancel := context.WithTimeout(t.p.ctx, callTimeout)
	defer cancel()
	_, _ = cl.ReportBadParent(ctx, &schedulerpb.ReportBadParentRequest{PeerId: t.p.id, TaskId: t.id, ParentId: parent})
}

func (t *task) pieceDone(n int, err error, parent string) {
	t.mu.Lock()
	delete(t.inflight, n)
	switch {
	case err == nil:
		t.have[n] = true
		delete(t.urgent, n)
		delete(t.wanted, n)
		delete(t.waitUntil, n)
		delete(t.waits, n)
		if parent != "" {
			t.parentOf[n] = parent
		}
	case errors.Is(err, errRetry):
	case errors.Is(err, errBusy):
		t.waitUntil[n] = time.Now().Add(waitBackoff / 2)
	default:
		if t.p.ctx.Err() == nil {
			t.p.log.Warn("piece failed", "task", t.id, "piece", n, "err", err)
		}
		t.failed[n] = err
		delete(t.urgent, n)
		delete(t.wanted, n)
	}
	t.broadcastLocked()
	t.mu.Unlock()
	t.wake()
}

// waitRange waits until pieces first..last are held, one of them failed,
// or the task failed.
func (t *task) waitRange(ctx context.Context, first, last int) error {
	for {
		t.mu.Lock()
		if t.fatal != nil {
			err := t.fatal
			t.mu.Unlock()
			return err
		}
		missing := false
		for n := first; n <= last; n++ {
			if t.have[n] {
				continue
			}
			if err := t.failed[n]; err != nil {
				t.mu.Unlock()
				return err
			}
			missing = true
		}
		if !missing {
			t.mu.Unlock()
			return nil
		}
		ch := t.changed
		t.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-t.p.ctx.Done():
			return errors.New("peer stopped")
		}
	}
}
