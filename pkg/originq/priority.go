// Package originq shares the link to an origin (a registry host) among the
// kinds of work that use it, so that a read a container is blocked on
// never queues behind bytes nobody is waiting for yet.
//
// A Gate admits at most N requests in flight per host. Waiters are served
// highest priority first, FIFO within a priority, and each priority below
// Demand may only start a request while fewer than its limit are in flight
// (see Limit): the slots above a priority's limit stay free for the work
// above it, since an HTTP request in flight cannot be preempted.
//
// The priority of a request travels in its context (WithPriority,
// PriorityFrom). A Level is a priority that may be raised while a request
// waits: a chunk that background fetch claimed and a demand read then
// needs moves up to Demand in the queue instead of holding the read back.
package originq

import (
	"context"
	"sync"
)

// Priority orders the work on an origin link; higher goes first. The zero
// value means "not set" and counts as Demand.
type Priority int

const (
	// Seed is a seed peer's whole-blob fetch on behalf of the cluster.
	Seed Priority = iota + 1
	// Background is a lazy layer's background fetch of its remaining chunks.
	Background
	// Prefetch is a lazy layer's prioritized region (before the prefetch
	// landmark) and read-ahead.
	Prefetch
	// Demand is a read a container (or a client) is blocked on.
	Demand
)

// priorities lists every priority, highest first.
var priorities = [...]Priority{Demand, Prefetch, Background, Seed}

func (p Priority) String() string {
	switch p {
	case Seed:
		return "seed"
	case Background:
		return "background"
	case Prefetch:
		return "prefetch"
	case Demand:
		return "demand"
	}
	return "demand"
}

// valid maps an unset or unknown priority to Demand: work whose kind
// nobody named is treated as the most urgent, never starved.
func (p Priority) valid() Priority {
	if p < Seed || p > Demand {
		return Demand
	}
	return p
}

type ctxKey struct{}

// WithPriority returns ctx carrying p for the origin requests made under it.
func WithPriority(ctx context.Context, p Priority) context.Context {
	return context.WithValue(ctx, ctxKey{}, p.valid())
}

// WithLevel returns ctx carrying l: requests made under it have l's
// priority, and raising l moves those still waiting for a slot.
func WithLevel(ctx context.Context, l *Level) context.Context {
	return context.WithValue(ctx, ctxKey{}, l)
}

// PriorityFrom returns the priority ctx carries, Demand when none.
func PriorityFrom(ctx context.Context) Priority {
	p, _ := priorityOf(ctx)
	return p
}

func priorityOf(ctx context.Context) (Priority, bool) {
	switch v := ctx.Value(ctxKey{}).(type) {
	case Priority:
		return v, true
	case *Level:
		return v.Priority(), true
	}
	return Demand, false
}

func levelOf(ctx context.Context) *Level {
	l, _ := ctx.Value(ctxKey{}).(*Level)
	return l
}

// Level is a priority that can be raised (never lowered) while the
// requests made with it wait for a slot. It is safe for concurrent use.
type Level struct {
	mu      sync.Mutex
	p       Priority
	waiters map[*waiter]func(Priority) // requests waiting with this level
}

// NewLevel returns a Level at p.
func NewLevel(p Priority) *Level { return &Level{p: p.valid()} }

// Priority returns the level's current priority.
func (l *Level) Priority() Priority {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.p
}

// Raise sets the level to p if that is higher, and moves the requests
// waiting with it up their queues.
func (l *Level) Raise(p Priority) {
	if l == nil {
		return
	}
	p = p.valid()
	l.mu.Lock()
	if p <= l.p {
		l.mu.Unlock()
		return
	}
	l.p = p
	moves := make([]func(Priority), 0, len(l.waiters))
	for _, m := range l.waiters {
		moves = append(moves, m)
	}
	l.mu.Unlock()
	// Not under l.mu: a move takes the gate's lock, and the gate takes
	// l.mu while it holds its own (register).
	for _, m := range moves {
		m(p)
	}
}

// register records a waiting request and returns the level's priority as
// of now; a later Raise calls move.
func (l *Level) register(w *waiter, move func(Priority)) Priority {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.waiters == nil {
		l.waiters = map[*waiter]func(Priority){}
	}
	l.waiters[w] = move
	return l.p
}

func (l *Level) unregister(w *waiter) {
	l.mu.Lock()
	delete(l.waiters, w)
	l.mu.Unlock()
}
