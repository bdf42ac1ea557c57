package peer

import (
	"crypto/tls"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/cluster"
	"github.com/starling-dev/starling/pkg/scheduler"
)

// Schedulers holds a connection to each configured scheduler. A task's
// scheduler is picked by rendezvous hashing of its ID over every configured
// address, so schedulers share nothing and every client of the P2P network
// (peers, starling preheat) picks the same one. It is safe for concurrent use.
type Schedulers struct {
	addrs   []string
	conns   []*grpc.ClientConn
	clients map[string]schedulerpb.SchedulerClient
}

// DialOption changes how DialSchedulers connects.
type DialOption func(*dialOptions)

type dialOptions struct{ tls *tls.Config }

// WithTLS dials the schedulers over TLS with cfg (a cluster.ClientTLS);
// nil keeps plaintext.
func WithTLS(cfg *tls.Config) DialOption { return func(o *dialOptions) { o.tls = cfg } }

// DialSchedulers prepares connections to addrs; gRPC connects on the first
// call, with a short reconnect backoff so that a restarted scheduler is
// reached again within seconds rather than gRPC's default two minutes. The
// result holds every address that could be dialled; the error names those
// that could not (a malformed address) and the caller decides whether to go
// on without them.
func DialSchedulers(addrs []string, opts ...DialOption) (*Schedulers, error) {
	var o dialOptions
	for _, f := range opts {
		f(&o)
	}
	var creds credentials.TransportCredentials = insecure.NewCredentials()
	if o.tls != nil {
		creds = cluster.Credentials(o.tls)
	}
	s := &Schedulers{addrs: addrs, clients: map[string]schedulerpb.SchedulerClient{}}
	var errs []error
	for _, a := range addrs {
		conn, err := grpc.Dial(a,
			grpc.WithTransportCredentials(creds),
			grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           backoff.Config{BaseDelay: 200 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 2 * time.Second},
				MinConnectTimeout: 2 * time.Second,
			}))
		if err != nil {
			errs = append(errs, fmt.Errorf("scheduler %s: %w", a, err))
			continue
		}
		s.conns = append(s.conns, conn)
		s.clients[a] = schedulerpb.NewSchedulerClient(conn)
	}
	return s, errors.Join(errs...)
}

// Addrs are the configured addresses, dialled or not.
func (s *Schedulers) Addrs() []string { return s.addrs }

// Pick returns the scheduler of a task and its client (nil when that
// address could not be dialled).
func (s *Schedulers) Pick(taskID string) (string, schedulerpb.SchedulerClient) {
	a := scheduler.Pick(taskID, s.addrs)
	return a, s.clients[a]
}

// Client returns the client of one scheduler (nil when it is not dialled).
func (s *Schedulers) Client(addr string) schedulerpb.SchedulerClient { return s.clients[addr] }

// Close closes every connection.
func (s *Schedulers) Close() error {
	var errs []error
	for _, c := range s.conns {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}
