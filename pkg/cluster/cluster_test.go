package cluster_test

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/cluster"
	"github.com/starling-dev/starling/pkg/config"
)

// node issues a certificate in a CA directory and loads it.
func node(t *testing.T, dir, name string, o cluster.IssueOptions) *cluster.Cluster {
	t.Helper()
	o.Out = filepath.Join(dir, "nodes")
	is, err := cluster.Issue(dir, name, o)
	if err != nil {
		t.Fatal(err)
	}
	c, err := cluster.Load(config.Cluster{CA: is.CA, Cert: is.Cert, Key: is.Key})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newCA(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if _, _, err := cluster.Init(dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestInitIssue(t *testing.T) {
	dir := newCA(t)
	st, err := os.Stat(filepath.Join(dir, "ca.key"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("ca.key: %v, mode %v", err, st.Mode())
	}
	if _, _, err := cluster.Init(dir); err == nil || !strings.Contains(err.Error(), "refusing") {
		t.Fatalf("second init: %v, want a refusal", err)
	}
	is, err := cluster.Issue(dir, "seed1", cluster.IssueOptions{Roles: []string{cluster.RoleSeed, cluster.RolePeer},
		IPs: []net.IP{net.ParseIP("127.0.0.1")}})
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(is.Key); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("node key: %v", err)
	}
	if _, err := cluster.Issue(dir, "seed1", cluster.IssueOptions{}); err == nil {
		t.Fatal("issuing over an existing certificate worked")
	}
	if _, err := cluster.Issue(dir, "../x", cluster.IssueOptions{}); err == nil {
		t.Fatal("a node name with a slash was accepted")
	}
	c, err := cluster.Load(config.Cluster{CA: is.CA, Cert: is.Cert, Key: is.Key})
	if err != nil {
		t.Fatal(err)
	}
	id := c.Identity()
	if id.Name != "seed1" || !id.Has(cluster.RoleSeed) || !id.Has(cluster.RolePeer) || id.Has(cluster.RoleScheduler) {
		t.Fatalf("identity %+v", id)
	}
	// A node certificate of another CA is refused at load.
	other := newCA(t)
	is2, err := cluster.Issue(other, "n", cluster.IssueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cluster.Load(config.Cluster{CA: is.CA, Cert: is2.Cert, Key: is2.Key}); err == nil {
		t.Fatal("a certificate of another CA loaded")
	}
	if c, err := cluster.Load(config.Cluster{}); c != nil || err != nil || c.Enabled() {
		t.Fatalf("empty configuration: %v, %v", c, err)
	}
	if _, err := cluster.Load(config.Cluster{CA: is.CA}); err == nil {
		t.Fatal("a CA without a certificate loaded")
	}
}

// serve runs an HTTPS server with cfg that answers the client's CN.
func serve(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, _ := cluster.FromRequest(r)
		io.WriteString(w, id.Name)
	}))
	srv.TLS = cfg
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

func get(cfg *tls.Config, addr string) (string, error) {
	d := &net.Dialer{Timeout: 2 * time.Second}
	c := &http.Client{Transport: &http.Transport{DialTLSContext: cluster.DialTLS(cfg, d)}, Timeout: 5 * time.Second}
	resp, err := c.Get("https://" + addr + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

func TestMutualTLS(t *testing.T) {
	dir := newCA(t)
	srvNode := node(t, dir, "server", cluster.IssueOptions{IPs: []net.IP{net.ParseIP("127.0.0.1")}})
	cli := node(t, dir, "client1", cluster.IssueOptions{})
	addr := serve(t, srvNode.ServerTLS())

	got, err := get(cli.ClientTLS(), addr)
	if err != nil || got != "client1" {
		t.Fatalf("member: %q, %v", got, err)
	}
	// The server must have the role asked for.
	if _, err := get(cli.ClientTLS(cluster.RoleScheduler), addr); err == nil {
		t.Fatal("a peer certificate passed as a scheduler")
	}
	// No client certificate: refused by the server.
	noCert := cli.ClientTLS()
	noCert.Certificates = nil
	if _, err := get(noCert, addr); err == nil {
		t.Fatal("a client without a certificate got an answer")
	}
	// A client of another CA: refused by the server; a server of another
	// CA: refused by the client.
	stranger := node(t, newCA(t), "stranger", cluster.IssueOptions{IPs: []net.IP{net.ParseIP("127.0.0.1")}})
	if _, err := get(stranger.ClientTLS(), addr); err == nil {
		t.Fatal("a client of another CA got an answer")
	}
	strangeAddr := serve(t, stranger.ServerTLS())
	if _, err := get(cli.ClientTLS(), strangeAddr); err == nil {
		t.Fatal("the client accepted a server of another CA")
	}
	// A certificate with SANs must match the address dialled.
	elsewhere := node(t, dir, "elsewhere", cluster.IssueOptions{IPs: []net.IP{net.ParseIP("10.9.9.9")}})
	if _, err := get(cli.ClientTLS(), serve(t, elsewhere.ServerTLS())); err == nil || !strings.Contains(err.Error(), "10.9.9.9") {
		t.Fatalf("a server certificate for 10.9.9.9 dialled at 127.0.0.1: %v", err)
	}
	// Without SANs: chain and role are enough.
	bare := node(t, dir, "bare", cluster.IssueOptions{})
	if _, err := get(cli.ClientTLS(), serve(t, bare.ServerTLS())); err != nil {
		t.Fatalf("server without SANs: %v", err)
	}
}

func TestRequireMember(t *testing.T) {
	dir := newCA(t)
	srvNode := node(t, dir, "sched", cluster.IssueOptions{Roles: []string{cluster.RoleScheduler}})
	cli := node(t, dir, "cli", cluster.IssueOptions{Roles: []string{cluster.RoleClient}})
	h := cluster.RequireMember(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }), "/healthy")
	srv := httptest.NewUnstartedServer(h)
	srv.TLS = srvNode.ServerTLSOptionalClient()
	srv.StartTLS()
	defer srv.Close()
	anon := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	member := &http.Client{Transport: &http.Transport{DialTLSContext: cluster.DialTLS(cli.ClientTLS(cluster.RoleScheduler), &net.Dialer{})}}
	for _, c := range []struct {
		client *http.Client
		path   string
		want   int
	}{
		{anon, "/healthy", 200}, {anon, "/api/v1/preheat", 401}, {anon, "/api/v1/tasks/x", 401}, {anon, "//api/v1/tasks", 401},
		{member, "/api/v1/tasks/x", 200}, {member, "/healthy", 200},
	} {
		resp, err := c.client.Get(srv.URL + c.path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("%s: %d, want %d", c.path, resp.StatusCode, c.want)
		}
	}
}

type announcer struct {
	schedulerpb.UnimplementedSchedulerServer
}

func (announcer) Announce(ctx context.Context, req *schedulerpb.AnnounceRequest) (*schedulerpb.AnnounceResponse, error) {
	if err := cluster.CheckPeer(ctx, req.GetPeer().GetId(), req.GetPeer().GetSeed()); err != nil {
		return nil, err
	}
	return &schedulerpb.AnnounceResponse{}, nil
}

func (announcer) Preheat(context.Context, *schedulerpb.PreheatRequest) (*schedulerpb.PreheatResponse, error) {
	return &schedulerpb.PreheatResponse{}, nil
}

func (announcer) Leave(context.Context, *schedulerpb.LeaveRequest) (*schedulerpb.LeaveResponse, error) {
	return &schedulerpb.LeaveResponse{}, nil
}

func TestRolesOverGRPC(t *testing.T) {
	dir := newCA(t)
	sched := node(t, dir, "sched", cluster.IssueOptions{Roles: []string{cluster.RoleScheduler}})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(cluster.ServerCredentials(sched)), grpc.UnaryInterceptor(cluster.UnaryServerInterceptor()))
	schedulerpb.RegisterSchedulerServer(g, announcer{})
	go g.Serve(l)
	defer g.Stop()

	call := func(c *cluster.Cluster, f func(context.Context, schedulerpb.SchedulerClient) error) codes.Code {
		t.Helper()
		conn, err := grpc.Dial(l.Addr().String(), grpc.WithTransportCredentials(cluster.Credentials(c.ClientTLS(cluster.RoleScheduler))))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return status.Code(f(ctx, schedulerpb.NewSchedulerClient(conn)))
	}
	announce := func(id string, seed bool) func(context.Context, schedulerpb.SchedulerClient) error {
		return func(ctx context.Context, c schedulerpb.SchedulerClient) error {
			_, err := c.Announce(ctx, &schedulerpb.AnnounceRequest{Peer: &schedulerpb.PeerInfo{Id: id, Seed: seed}})
			return err
		}
	}
	leave := func(id string) func(context.Context, schedulerpb.SchedulerClient) error {
		return func(ctx context.Context, c schedulerpb.SchedulerClient) error {
			_, err := c.Leave(ctx, &schedulerpb.LeaveRequest{PeerId: id})
			return err
		}
	}
	preheat := func(ctx context.Context, c schedulerpb.SchedulerClient) error {
		_, err := c.Preheat(ctx, &schedulerpb.PreheatRequest{})
		return err
	}
	p1 := node(t, dir, "p1", cluster.IssueOptions{})
	s1 := node(t, dir, "s1", cluster.IssueOptions{Roles: []string{cluster.RolePeer, cluster.RoleSeed}})
	cli := node(t, dir, "cli", cluster.IssueOptions{Roles: []string{cluster.RoleClient}})
	for _, c := range []struct {
		name string
		who  *cluster.Cluster
		f    func(context.Context, schedulerpb.SchedulerClient) error
		want codes.Code
	}{
		{"peer announces", p1, announce("p1", false), codes.OK},
		{"peer announces as seed", p1, announce("p1", true), codes.PermissionDenied},
		{"peer announces as another", p1, announce("s1", false), codes.PermissionDenied},
		{"peer leaves as another", p1, leave("s1"), codes.PermissionDenied},
		{"seed announces as seed", s1, announce("s1", true), codes.OK},
		{"client announces", cli, announce("cli", false), codes.PermissionDenied},
		{"client preheats", cli, preheat, codes.OK},
	} {
		if got := call(c.who, c.f); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
	// Another CA's certificate does not get through the handshake.
	stranger := node(t, newCA(t), "p1", cluster.IssueOptions{})
	if got := call(stranger, announce("p1", false)); got != codes.Unavailable {
		t.Errorf("stranger: %v, want Unavailable", got)
	}
}

func TestCheckPlaintext(t *testing.T) {
	for _, c := range []struct {
		cfg       config.Cluster
		listeners []string
		ok        bool
	}{
		{config.Cluster{}, []string{"127.0.0.1:4000", "[::1]:8002", "localhost:1", ""}, true},
		{config.Cluster{}, []string{"127.0.0.1:4000", ":4000"}, false},
		{config.Cluster{}, []string{"0.0.0.0:8002"}, false},
		{config.Cluster{}, []string{"10.0.0.1:8002"}, false},
		{config.Cluster{Insecure: true}, []string{":8002"}, true},
		{config.Cluster{CA: "ca.crt"}, []string{":8002"}, true},
	} {
		err := cluster.CheckPlaintext(c.cfg, c.listeners...)
		if (err == nil) != c.ok {
			t.Errorf("%+v %v: %v", c.cfg, c.listeners, err)
		}
	}
	if err := cluster.CheckPlaintext(config.Cluster{}, ":1"); err == nil || !strings.Contains(err.Error(), "insecure") {
		t.Errorf("message: %v", err)
	}
}
