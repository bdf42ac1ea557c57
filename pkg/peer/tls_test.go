package peer_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/cluster"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/peer"
)

// testCA is a cluster CA in a temporary directory.
type testCA struct {
	t   *testing.T
	dir string
}

func newTestCA(t *testing.T) testCA {
	dir := t.TempDir()
	if _, _, err := cluster.Init(dir); err != nil {
		t.Fatal(err)
	}
	return testCA{t, dir}
}

func (ca testCA) node(name string, roles ...string) *cluster.Cluster {
	ca.t.Helper()
	is, err := cluster.Issue(ca.dir, name, cluster.IssueOptions{Roles: roles, IPs: []net.IP{net.ParseIP("127.0.0.1")},
		Out: filepath.Join(ca.dir, "nodes")})
	if err != nil {
		ca.t.Fatal(err)
	}
	c, err := cluster.Load(config.Cluster{CA: is.CA, Cert: is.Cert, Key: is.Key})
	if err != nil {
		ca.t.Fatal(err)
	}
	return c
}

// startTLSScheduler serves a scheduler over mutual TLS, as starling-scheduler does.
func startTLSScheduler(t *testing.T, c *cluster.Cluster) string {
	addr, _ := testenv.StartTLSScheduler(t, c)
	return addr
}

func tlsPeer(t *testing.T, sched string, c *cluster.Cluster) testPeer {
	reg := prometheus.NewRegistry()
	p := newPeer(t, peer.Options{ID: c.Identity().Name, Schedulers: []string{sched}, UploadListen: "127.0.0.1:0",
		PieceSize: 1 << 20, Registerer: reg, Logger: quiet, AnnounceInterval: 100 * time.Millisecond,
		UploadTLS: c.ServerTLS(), ClientTLS: c.ClientTLS(cluster.RolePeer, cluster.RoleSeed),
		SchedulerTLS: c.ClientTLS(cluster.RoleScheduler)})
	return testPeer{p, reg}
}

// Two peers and a scheduler over mutual TLS: a whole blob and a lazy range
// go from one peer to the other; nobody without a certificate from the
// cluster CA gets a piece, a range or an announce in.
func TestMutualTLSCluster(t *testing.T) {
	noLeaks(t)
	ca := newTestCA(t)
	sched := startTLSScheduler(t, ca.node("sched", cluster.RoleScheduler))
	p1 := tlsPeer(t, sched, ca.node("p1"))
	p2 := tlsPeer(t, sched, ca.node("p2"))
	time.Sleep(300 * time.Millisecond) // both announced

	// A whole blob: p1 from the origin, then p2 from p1.
	blob, digest := newMemBlob(t, 3<<20+5)
	origin := &slowOrigin{data: blob.data}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, p := range []testPeer{p1, p2} {
		d, err := p.Open(ctx, peer.Request{TaskID: digest, Digest: digest, Length: int64(len(blob.data)), Source: origin})
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(d.NewReader(ctx, 0, -1))
		if err != nil || !bytes.Equal(b, blob.data) {
			t.Fatalf("peer %s: %d bytes, %v", p.ID(), len(b), err)
		}
		if err := d.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		d.Close()
	}
	if got := testenv.Counter(t, p2.reg, "starling_peer_piece_bytes_total", "source", "parent"); got != float64(len(blob.data)) {
		t.Errorf("p2 took %.0f bytes from its parent over TLS, want %d", got, len(blob.data))
	}
	if n := origin.bytes.Load(); n != int64(len(blob.data)) {
		t.Errorf("the origin sent %d bytes for a %d-byte blob", n, len(blob.data))
	}

	// A lazy range: p1 reads it from the origin, p2 from p1.
	lb, ldigest := newMemBlob(t, 1<<20)
	lorigin := &slowOrigin{data: lb.data}
	req := peer.Request{TaskID: ldigest, Digest: ldigest, Length: int64(len(lb.data)), Source: lorigin}
	f1 := p1.NewLazyFetcher(req, &memBlob{data: lb.data})
	defer f1.Close()
	if got := readRange(t, f1, 4096, 100000); !bytes.Equal(got, lb.data[4096:4096+100000]) {
		t.Fatal("p1: wrong range")
	}
	direct2 := &memBlob{data: lb.data}
	f2 := p2.NewLazyFetcher(req, direct2)
	defer f2.Close()
	if got := readRange(t, f2, 4096, 100000); !bytes.Equal(got, lb.data[4096:4096+100000]) {
		t.Fatal("p2: wrong range")
	}
	if got := f2.BytesBySource()["peer"]; got != 100000 || direct2.calls.Load() != 0 {
		t.Errorf("p2 got %d bytes from peers (sources %v), read the registry %d times", got, f2.BytesBySource(), direct2.calls.Load())
	}

	// Outsiders: no certificate, another CA's certificate, plaintext.
	up := p1.UploadAddr()
	stranger := newTestCA(t).node("p1")
	noCert := ca.node("nocert").ClientTLS()
	noCert.Certificates = nil
	for _, path := range []string{"/pieces/" + digest + "/0", "/ranges/" + ldigest} {
		for name, cfg := range map[string]*tls.Config{"no certificate": noCert, "another CA": stranger.ClientTLS()} {
			c := &http.Client{Transport: &http.Transport{DialTLSContext: cluster.DialTLS(cfg, &net.Dialer{})}, Timeout: 5 * time.Second}
			if resp, err := c.Get("https://" + up + path); err == nil {
				resp.Body.Close()
				t.Errorf("%s: GET %s answered %s", name, path, resp.Status)
			}
		}
		c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
		if resp, err := c.Get("http://" + up + path); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusPartialContent || bytes.Contains(b, blob.data[:64]) {
				t.Errorf("plaintext GET %s answered %s", path, resp.Status)
			}
		}
	}
	// A member's certificate does fetch a piece (the path above is right).
	member := &http.Client{Transport: &http.Transport{DialTLSContext: cluster.DialTLS(ca.node("p3").ClientTLS(), &net.Dialer{})}, Timeout: 5 * time.Second}
	resp, err := member.Get("https://" + up + "/pieces/" + digest + "/0")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("member: %v %v", resp, err)
	}
	resp.Body.Close()
	member.CloseIdleConnections()

	announce := func(creds credentials.TransportCredentials, id string, seed bool) error {
		conn, err := grpc.Dial(sched, grpc.WithTransportCredentials(creds))
		if err != nil {
			return err
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_, err = schedulerpb.NewSchedulerClient(conn).Announce(ctx, &schedulerpb.AnnounceRequest{Peer: &schedulerpb.PeerInfo{Id: id, Seed: seed}})
		return err
	}
	schedNoCert := ca.node("x").ClientTLS(cluster.RoleScheduler)
	schedNoCert.Certificates = nil
	for name, err := range map[string]error{
		"plaintext":          announce(insecure.NewCredentials(), "evil", true),
		"no certificate":     announce(cluster.Credentials(schedNoCert), "evil", true),
		"another CA":         announce(cluster.Credentials(stranger.ClientTLS(cluster.RoleScheduler)), "p1", false),
		"peer as seed":       announce(cluster.Credentials(ca.node("p4").ClientTLS(cluster.RoleScheduler)), "p4", true),
		"peer as other peer": announce(cluster.Credentials(ca.node("p5").ClientTLS(cluster.RoleScheduler)), "p1", false),
	} {
		if err == nil {
			t.Errorf("%s: announce accepted", name)
		}
	}
	if err := announce(cluster.Credentials(ca.node("s1", cluster.RolePeer, cluster.RoleSeed).ClientTLS(cluster.RoleScheduler)), "s1", true); err != nil {
		t.Errorf("a seed's announce: %v", err)
	}
}
