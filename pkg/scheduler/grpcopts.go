package scheduler

import (
	"context"
	"net"
	"sync"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Bounds of the scheduler's gRPC server (finding 9 of issue 11: no
// connection or stream limits, 64 MiB messages).
const (
	// MaxRecvMsgSize bounds one request. gRPC allocates a message's buffer
	// from its length prefix before the bytes arrive, so this times
	// maxStreams is what one connection can make the scheduler allocate.
	// The largest request is a full announce: about 70 bytes a piece, so
	// 16 MiB lists some 230k pieces (230 GiB in 1 MiB pieces).
	MaxRecvMsgSize = 16 << 20
	// maxSendMsgSize bounds one answer; answers are bounded by the
	// request limits (pieces and tasks per call, parents per piece).
	maxSendMsgSize = 16 << 20
	// maxStreams bounds the calls in flight on one connection; a peer's
	// further calls queue in its client.
	maxStreams = 32
	// connTimeout bounds the TLS handshake and HTTP/2 preface of a new
	// connection.
	connTimeout = 10 * time.Second
	// idleTimeout closes a connection without calls for this long: a live
	// peer heartbeats every second or so.
	idleTimeout = 5 * time.Minute
	// clientRate and clientBurst are each client address's token bucket,
	// in calls. A busy node calls a few hundred times a second (a schedule
	// per task per 50 ms tick, a report per piece, a range per lazy read).
	clientRate  = 2000
	clientBurst = 4000
	// maxClients bounds the token buckets kept; idle ones are dropped
	// first, and beyond it unknown clients share one bucket.
	maxClients = 1 << 16
)

// GRPCServerOptions are the options of the scheduler's gRPC server: message
// size, streams per connection, connection and idle timeouts, keepalive
// enforcement, and a per-client rate limit (token bucket per remote IP;
// over it a call fails with ResourceExhausted). Pass them to grpc.NewServer
// together with the transport credentials.
func GRPCServerOptions() []grpc.ServerOption {
	rl := newRateLimiter(clientRate, clientBurst, maxClients, time.Now)
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxRecvMsgSize),
		grpc.MaxSendMsgSize(maxSendMsgSize),
		grpc.MaxConcurrentStreams(maxStreams),
		grpc.ConnectionTimeout(connTimeout),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: idleTimeout,
			Time:              time.Minute,
			Timeout:           20 * time.Second,
		}),
		// Pings from a client faster than this close its connection.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.ChainUnaryInterceptor(rl.unary),
	}
}

// rateLimiter keeps a token bucket per client address.
type rateLimiter struct {
	r     rate.Limit
	burst int
	max   int
	now   func() time.Time

	mu sync.Mutex
	by map[string]*clientBucket
	// shared serves the clients beyond max buckets.
	shared *rate.Limiter
}

type clientBucket struct {
	l    *rate.Limiter
	last time.Time
}

func newRateLimiter(r rate.Limit, burst, maxClients int, now func() time.Time) *rateLimiter {
	return &rateLimiter{r: r, burst: burst, max: maxClients, now: now, by: map[string]*clientBucket{},
		shared: rate.NewLimiter(r, burst)}
}

// allow takes a token of key's bucket.
func (rl *rateLimiter) allow(key string) bool {
	now := rl.now()
	rl.mu.Lock()
	defer rl.mu.Unlock()
	b := rl.by[key]
	if b == nil {
		if len(rl.by) >= rl.max {
			// A full bucket is one nobody used for the time it takes to
			// refill: dropping it loses nothing.
			idle := time.Duration(float64(rl.burst)/float64(rl.r)*float64(time.Second)) + time.Second
			for k, o := range rl.by {
				if now.Sub(o.last) > idle {
					delete(rl.by, k)
				}
			}
		}
		if len(rl.by) >= rl.max {
			return rl.shared.AllowN(now, 1)
		}
		b = &clientBucket{l: rate.NewLimiter(rl.r, rl.burst)}
		rl.by[key] = b
	}
	b.last = now
	return b.l.AllowN(now, 1)
}

func (rl *rateLimiter) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	key := "unknown"
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		key = p.Addr.String()
		if host, _, err := net.SplitHostPort(key); err == nil {
			key = host
		}
	}
	if !rl.allow(key) {
		return nil, status.Errorf(codes.ResourceExhausted, "%s: too many calls from %s", info.FullMethod, key)
	}
	return h(ctx, req)
}
