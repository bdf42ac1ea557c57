package testenv

import (
	"io"
	"log/slog"
	"net"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/starling-dev/starling/pkg/cluster"
	"github.com/starling-dev/starling/pkg/scheduler"
)

// StartScheduler serves a real scheduler over gRPC on a loopback port
// until the test ends; it returns the address and the server.
// Its start grace is off: a test's peers hold nothing to re-announce.
func StartScheduler(t testing.TB) (string, *scheduler.Server) {
	t.Helper()
	return startScheduler(t)
}

// StartTLSScheduler is StartScheduler over mutual TLS with the cluster
// identity c (a certificate with the scheduler role), binding every call
// to its caller's certificate as starling-scheduler does.
func StartTLSScheduler(t testing.TB, c *cluster.Cluster) (string, *scheduler.Server) {
	t.Helper()
	return startScheduler(t, grpc.Creds(cluster.ServerCredentials(c)), grpc.ChainUnaryInterceptor(cluster.UnaryServerInterceptor()))
}

func startScheduler(t testing.TB, opts ...grpc.ServerOption) (string, *scheduler.Server) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	// Test registries are on loopback, which only an entry naming the host
	// admits to a preheat.
	srv, err := scheduler.NewServer(scheduler.New(scheduler.Options{StartGrace: -1}),
		scheduler.ServerOptions{Logger: quiet, PreheatAllowed: []string{"127.0.0.1:*"}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(opts...)
	srv.RegisterGRPC(g)
	go func() { _ = g.Serve(l) }()
	t.Cleanup(g.Stop)
	return l.Addr().String(), srv
}

// Counter sums the samples of a counter whose label has value (label ""
// sums them all).
func Counter(t testing.TB, g prometheus.Gatherer, name, label, value string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			ok := label == ""
			for _, lp := range m.GetLabel() {
				if lp.GetName() == label && lp.GetValue() == value {
					ok = true
				}
			}
			if ok {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}
