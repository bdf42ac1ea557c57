package peer

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/scheduler"
)

// callTimeout bounds one scheduler call: the scheduler answers from
// memory, so anything slower means it is down or unreachable and the peer
// is better off going to the origin.
const callTimeout = 3 * time.Second

// schedClient is the peer's side of the scheduler protocol: heartbeats,
// holdings, and the work a scheduler gives a seed.
type schedClient struct {
	*Schedulers
	p *Peer

	mu      sync.Mutex
	synced  map[string]bool // schedulers that have our full holdings
	up      bool
	working map[string]bool // seed work being done
}

func newSchedClient(p *Peer, addrs []string) *schedClient {
	s, err := DialSchedulers(addrs, WithTLS(p.schedulerTLS()))
	if err != nil {
		// The others still serve; the announce loop reports the missing one.
		p.log.Error("scheduler address", "err", err)
	}
	return &schedClient{Schedulers: s, p: p, synced: map[string]bool{}, working: map[string]bool{}, up: true}
}

// setUp records whether the schedulers answer, logging the changes.
func (c *schedClient) setUp(up bool, err error) {
	c.mu.Lock()
	was := c.up
	c.up = up
	c.mu.Unlock()
	if up {
		c.p.m.schedulerUp.Set(1)
	} else {
		c.p.m.schedulerUp.Set(0)
	}
	switch {
	case was && !up:
		c.p.log.Warn("scheduler unreachable: fetching from the origin directly until it is back", "err", err)
	case !was && up:
		c.p.log.Info("scheduler reachable again")
	}
}

func (c *schedClient) info() *schedulerpb.PeerInfo {
	pi := &schedulerpb.PeerInfo{Id: c.p.id, Capacity: int32(c.p.o.UploadConcurrency),
		Zone: c.p.o.Zone, Rack: c.p.o.Rack, Seed: c.p.o.Seed}
	if c.p.up != nil {
		pi.Load = int32(c.p.up.load())
		host, port, _ := net.SplitHostPort(c.p.up.l.Addr().String())
		n, _ := strconv.Atoi(port)
		pi.UploadPort = int32(n)
		pi.Ip = c.p.o.AdvertiseIP
		if pi.Ip == "" {
			pi.Ip = advertiseIP(host)
		}
	} else {
		// Without an upload server the peer only downloads.
		pi.Capacity = 0
	}
	return pi
}

// advertiseIP picks the address to give other peers when none is configured.
func advertiseIP(listenHost string) string {
	if ip := net.ParseIP(listenHost); ip != nil && !ip.IsUnspecified() {
		return ip.String()
	}
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && !n.IP.IsLoopback() && n.IP.To4() != nil {
			return n.IP.String()
		}
	}
	return "127.0.0.1"
}

func (c *schedClient) announceLoop(ctx context.Context) {
	t := time.NewTicker(c.p.o.AnnounceInterval)
	defer t.Stop()
	for {
		var firstErr error
		for _, a := range c.addrs {
			if err := c.announce(ctx, a); err != nil && firstErr == nil {
				firstErr = err
			}
		}
		if ctx.Err() != nil {
			return
		}
		c.setUp(firstErr == nil, firstErr)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// announce is the heartbeat to one scheduler; a scheduler that does not
// know the peer (it restarted) gets the full list of what the peer holds.
func (c *schedClient) announce(ctx context.Context, addr string) error {
	cl := c.Client(addr)
	if cl == nil {
		return fmt.Errorf("scheduler %s: no client", addr)
	}
	c.mu.Lock()
	full := !c.synced[addr]
	c.mu.Unlock()
	for range 2 {
		req := &schedulerpb.AnnounceRequest{Peer: c.info(), Full: full}
		if full {
			req.Tasks = c.held(addr)
		}
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		resp, err := cl.Announce(cctx, req)
		cancel()
		if err != nil {
			c.mu.Lock()
			c.synced[addr] = false
			c.mu.Unlock()
			return fmt.Errorf("announce to scheduler %s: %w", addr, err)
		}
		for _, w := range resp.GetWork() {
			c.startWork(w)
		}
		if resp.GetResync() && !full {
			full = true
			continue
		}
		break
	}
	c.mu.Lock()
	c.synced[addr] = true
	c.mu.Unlock()
	return nil
}

// held lists the stored tasks that belong to scheduler addr, with their pieces.
func (c *schedClient) held(addr string) []*schedulerpb.HeldTask {
	var out []*schedulerpb.HeldTask
	for _, h := range c.p.store.Holdings() {
		if (len(h.Pieces) == 0 && len(h.Ranges) == 0) || scheduler.Pick(h.ID, c.addrs) != addr {
			continue
		}
		ht := &schedulerpb.HeldTask{TaskId: h.ID, Length: h.Length, PieceSize: h.PieceSize}
		for _, r := range h.Ranges {
			ht.Ranges = append(ht.Ranges, &schedulerpb.ByteRange{Offset: r.Off, Length: r.End - r.Off})
		}
		for n, d := range h.Pieces {
			ht.Pieces = append(ht.Pieces, &schedulerpb.PieceDigest{Number: int32(n), Digest: d})
		}
		out = append(out, ht)
	}
	return out
}

// startWork downloads a task a scheduler asked this (seed) peer to fetch.
func (c *schedClient) startWork(w *schedulerpb.Work) {
	c.mu.Lock()
	if c.working[w.GetTaskId()] {
		c.mu.Unlock()
		return
	}
	c.working[w.GetTaskId()] = true
	c.mu.Unlock()
	hdr := http.Header{}
	for k, v := range w.GetHeader() {
		hdr[k] = v.GetValues()
	}
	c.p.wg.Add(1)
	go func() {
		defer c.p.wg.Done()
		defer func() {
			c.mu.Lock()
			delete(c.working, w.GetTaskId())
			c.mu.Unlock()
		}()
		ctx := c.p.ctx
		d, err := c.p.Open(ctx, Request{TaskID: w.GetTaskId(), URL: w.GetUrl(), Header: hdr, Digest: w.GetDigest()})
		if err != nil {
			c.p.log.Warn("scheduled download", "task", w.GetTaskId(), "url", w.GetUrl(), "err", err)
			return
		}
		defer d.Close()
		d.Start()
		if err := d.Wait(ctx); err != nil {
			c.p.log.Warn("scheduled download", "task", w.GetTaskId(), "url", w.GetUrl(), "err", err)
			return
		}
		c.p.log.Info("scheduled download done", "task", w.GetTaskId(), "bytes", d.Length())
	}()
}

func (c *schedClient) leave(ctx context.Context) {
	for a, cl := range c.Schedulers.clients {
		if _, err := cl.Leave(ctx, &schedulerpb.LeaveRequest{PeerId: c.p.id}); err != nil {
			c.p.log.Debug("leave", "scheduler", a, "err", err)
		}
	}
}

func workOf(r Request) *schedulerpb.Work {
	w := &schedulerpb.Work{TaskId: r.TaskID, Digest: r.Digest, Header: map[string]*schedulerpb.HeaderValues{}}
	if r.Lazy {
		// A lazy task goes to the scheduler without its URL and headers:
		// no seed is queued to pull the whole blob for a few ranges (the
		// nodes that read fetch what nobody holds themselves), and the
		// node's registry credentials stay on the node.
		return w
	}
	// No credential goes to the scheduler, which hands work to any seed:
	// not the client's Authorization or cookies, not a user:password in
	// the URL. A seed fetches with its own node's credentials
	// (Options.Authorizer); only headers that say nothing about who asks
	// travel.
	w.Url = WorkURL(r.URL)
	for k, v := range WorkHeader(r.Header) {
		w.Header[k] = &schedulerpb.HeaderValues{Values: v}
	}
	return w
}
