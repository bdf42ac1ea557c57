package p2p_test

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/internal/testenv"
)

// Issue 11's attacks that need a real network, replayed against a cluster
// of network namespaces: each shows the attack refused and the legitimate
// path still working.

// TestAttackFakeSeed (finding 2): a host without a cluster certificate
// announces itself as a seed to the mTLS scheduler, over and over while a
// real peer pulls a blob with a registry token: in plaintext, over TLS
// without a client certificate, and over TLS with a certificate of a CA of
// its own. Every announce fails, so it gets no work and no headers; nobody
// ever connects to its upload port; the real pulls work; and each client's
// token reaches the registry only from that client's own node.
func TestAttackFakeSeed(t *testing.T) {
	c := newClusterWith(t, "afs", "400mbit", true)
	c.addNode("seed", "seed")
	p1 := c.addNode("peer1", "peer")
	p2 := c.addNode("peer2", "peer")

	fake := c.net.AddHost("fake")
	// What a seed's upload server would receive: the fake seed counts
	// every request and every Authorization header that reaches it.
	var hits atomic.Int64
	var authSeen sync.Map
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if a := r.Header.Get("Authorization"); a != "" {
			authSeen.Store(a, r.RemoteAddr)
		}
		http.Error(w, "fake", http.StatusNotFound)
	}), ReadHeaderTimeout: 5 * time.Second}
	l := fake.Listen("tcp", fake.IP+":"+uploadPort)
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })

	caPEM, err := os.ReadFile(c.schedCert.ca)
	if err != nil {
		t.Fatal(err)
	}
	clusterCA := x509.NewCertPool()
	if !clusterCA.AppendCertsFromPEM(caPEM) {
		t.Fatalf("%s holds no PEM certificate", c.schedCert.ca)
	}
	foreign := selfMadeCert(t, fake.IP)
	forms := []struct {
		name  string
		creds credentials.TransportCredentials
	}{
		{"plaintext", insecure.NewCredentials()},
		// The CA certificate is no secret: the attacker trusts the
		// scheduler, it just has no certificate of its own.
		{"TLS without a client certificate", credentials.NewTLS(&tls.Config{RootCAs: clusterCA})},
		// Shown whatever CAs the server asks for (Go's client would
		// otherwise keep a certificate of a CA the server did not name).
		{"TLS with a certificate of another CA", credentials.NewTLS(&tls.Config{RootCAs: clusterCA,
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &foreign, nil }})},
	}
	announce := func(ctx context.Context, creds credentials.TransportCredentials) (*schedulerpb.AnnounceResponse, error) {
		conn, err := grpc.Dial(c.schedAddr, grpc.WithTransportCredentials(creds),
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
				return fake.DialContext(ctx, "tcp", addr)
			}))
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		return schedulerpb.NewSchedulerClient(conn).Announce(ctx, &schedulerpb.AnnounceRequest{
			Full: true,
			Peer: &schedulerpb.PeerInfo{Id: "fake-seed", Ip: fake.IP, UploadPort: 4000, Capacity: 100, Seed: true},
		})
	}

	// Once each up front, to see how each form is refused.
	for _, f := range forms {
		resp, err := announce(context.Background(), f.creds)
		if err == nil {
			t.Errorf("fake seed, %s: the scheduler accepted its announce (work: %d)", f.name, len(resp.GetWork()))
			continue
		}
		t.Logf("fake seed, %s: refused: %v", f.name, err)
	}

	// Then over and over while the real peers pull.
	ctx, cancel := context.WithCancel(context.Background())
	var accepted, works, headers atomic.Int64
	var wg sync.WaitGroup
	for _, f := range forms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				resp, err := announce(ctx, f.creds)
				if err == nil {
					accepted.Add(1)
					works.Add(int64(len(resp.GetWork())))
					for _, w := range resp.GetWork() {
						headers.Add(int64(len(w.GetHeader())))
					}
				}
				select {
				case <-ctx.Done():
				case <-time.After(100 * time.Millisecond):
				}
			}
		}()
	}

	pullCtx, pullCancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer pullCancel()
	b := c.pushBlob("attack/private", 32<<20, 21)
	token := map[*node]string{p1: "Bearer token-of-peer1-" + b.digest[7:19], p2: "Bearer token-of-peer2-" + b.digest[7:19]}
	pull := func(n *node) fetchResult {
		res := fetchResult{node: n}
		start := time.Now()
		req := n.blobRequest(pullCtx, b)
		req.Header.Set("Authorization", token[n])
		resp, err := n.client.Do(req)
		if err != nil {
			res.err = err
			return res
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			res.err = errors.New(resp.Status)
			return res
		}
		res.n, res.digest, res.err = hashBody(resp.Body)
		res.elapsed = time.Since(start)
		return res
	}
	r1 := pull(p1)
	r2 := pull(p2)
	cancel()
	wg.Wait()
	checkAll(t, b, []fetchResult{r1, r2})
	t.Logf("real pulls with the fake seed announcing: %s %.1f s, %s %.1f s", p1.name, r1.elapsed.Seconds(), p2.name, r2.elapsed.Seconds())

	if n := accepted.Load(); n > 0 {
		t.Errorf("the scheduler accepted %d announces of the fake seed; it handed it %d work items with %d headers", n, works.Load(), headers.Load())
	}
	if n := hits.Load(); n > 0 {
		t.Errorf("the fake seed's upload port received %d requests; want none", n)
	}
	authSeen.Range(func(k, v any) bool {
		t.Errorf("the fake seed received Authorization %q from %v", k, v)
		return true
	})
	// Nor can it take pieces from a peer's upload server: plaintext and
	// TLS without a cluster certificate both end before any byte of the
	// blob.
	for _, scheme := range []string{"http", "https"} {
		tr := &http.Transport{DialContext: fake.DialContext, TLSClientConfig: &tls.Config{RootCAs: clusterCA}}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+p1.host.IP+":"+uploadPort+"/pieces/"+b.digest+"/0", nil)
		resp, err := (&http.Client{Transport: tr}).Do(req)
		if err == nil {
			if resp.StatusCode/100 == 2 {
				t.Errorf("fake seed, %s: %s's upload server answered a piece of the blob: %s", scheme, p1.name, resp.Status)
			} else {
				t.Logf("fake seed, %s: %s's upload server: %s", scheme, p1.name, resp.Status)
			}
			resp.Body.Close()
		} else {
			t.Logf("fake seed, %s: %s's upload server: %v", scheme, p1.name, err)
		}
		cancel()
		tr.CloseIdleConnections()
	}
	// Each token reached the registry only from its own client's node,
	// never from the seed or another peer.
	for ip, vals := range c.origin.Authorizations() {
		for v, n := range vals {
			for owner, tok := range token {
				if v == tok && ip != owner.host.IP {
					t.Errorf("%s's registry token reached the registry from %s (%d requests); want only from %s", owner.name, hostName(c, ip), n, owner.host.IP)
				}
			}
		}
	}
}

// hostName names the cluster's host with address ip.
func hostName(c *cluster, ip string) string {
	for _, h := range c.net.Hosts() {
		if h.IP == ip {
			return h.Name + " (" + ip + ")"
		}
	}
	return ip
}

// selfMadeCert is a client certificate for ip signed by a CA of the
// attacker's own: valid, just not the cluster's.
func selfMadeCert(t *testing.T, ip string) tls.Certificate {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "attacker CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "seed"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP(ip)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, caDER}, PrivateKey: key}
}

// idleConns is the number of idle connections TestAttackIdleConns opens.
const idleConns = 20000

// victimNofile is the victim starlingd's RLIMIT_NOFILE: below idleConns,
// as on the machine where the finding 9 was reproduced (20000),
// so that a server that keeps every idle connection runs out of file
// descriptors.
const victimNofile = 16384

// TestAttackIdleConns (finding 9): node A holds the image's chunks (it
// read them all); an attacker on another host opens 20k connections to
// A's upload server, sends one request on each and leaves them idle,
// keep-alive, for the rest of the test. Node B then reads files lazily
// that only A holds: every byte must come from A, none from the registry.
// With no idle timeout and no connection limit, A runs out of file
// descriptors and B's reads go to the registry; the test fails then.
func TestAttackIdleConns(t *testing.T) {
	c := newLazyCluster(t, "aic", "100mbit", false)
	im := c.pushImage()
	a := c.addLazyNode("a", nodeOpts{nofile: victimNofile, logLevel: "info"})
	b := c.addLazyNode("b", nodeOpts{})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	if err := a.coldRead(ctx, im, allData()); err != nil {
		t.Fatal(err)
	}
	a.checkLazy(t, len(im.layers))
	c.waitQuiet()

	atk := c.net.AddHost("attacker")
	atks, conns, took := openIdle(t, atk, a.host.IP+":"+uploadPort, idleConns)
	t.Logf("attacker: %d idle keep-alive connections to %s's upload server open in %.1f s", conns, a.name, took.Seconds())
	if conns < idleConns*9/10 {
		t.Logf("attacker: only %d of %d connections got through (the server refused or dropped the rest)", conns, idleConns)
	}
	t.Logf("attacker: %d of them still open before B's read", stillOpenAll(atks))

	c.origin.Reset()
	before := a.uploads()
	start := time.Now()
	err := b.coldRead(ctx, im, allData())
	t.Logf("B's read with the idle connections held: %.1f s, %v", time.Since(start).Seconds(), err)
	t.Logf("attacker: %d of its %d connections still open after B's read", stillOpenAll(atks), conns)
	if err != nil {
		t.Fatal(err)
	}
	gets, detail := im.layerGets(c.origin)
	t.Logf("B's bytes by source: %v; A uploaded %.0f bytes; the registry sent %d bytes of the layers in %d GETs%s",
		b.sources(), a.uploads()-before, im.layerBytes(c.origin), gets, detail)
	// The chunks must come from A. A few footer bytes from the registry
	// (a layer's footer or TOC tail, whatever the node's policy for them)
	// are no sign of the attack; chunks are: with A out of reach, B takes
	// all of them, megabytes, from the registry.
	fromA := a.uploads() - before
	if direct := float64(im.layerBytes(c.origin)); fromA == 0 || direct > 0.01*fromA {
		t.Errorf("with %d idle connections on A's upload server, B took %.0f bytes of the layers from the registry in %d GETs and %.0f from A; want (nearly) all from A",
			conns, direct, gets, fromA)
	}
	if s := b.sources(); s != nil && s["peer"] == 0 {
		t.Errorf("B's status shows no bytes from peers: %v", s)
	}
	if strings.Contains(a.proc.Log(), "too many open files") {
		t.Errorf("A ran out of file descriptors under the idle connections (its log says \"too many open files\")")
	}
}

// uploads is what the node's upload server has sent (0 when its metrics
// do not answer).
func (n *lazyNode) uploads() float64 {
	v, _ := n.metric("starling_peer_upload_bytes_total")
	return v
}

// The attacker runs as child processes of the test binary (this machine's
// RLIMIT_NOFILE, 20000, cannot be raised without CAP_SYS_RESOURCE, and a
// process holds fewer connections than that): each holds its share of the
// connections, in the attacker host's namespace, until its stdin closes.
const (
	attackerEnv     = "STARLING_IDLE_ATTACKER" // ADDR,N: the helper's job
	attackerProcs   = 2
	attackerPrefix  = "idle-attacker:"
	attackerTimeout = 2 * time.Second
)

// idleAttacker is one attacker process.
type idleAttacker struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	out   *bufio.Scanner
	conns int
}

// openIdle has attackerProcs processes on host open n connections to addr
// in all, send a request on each (a piece no one has: a quick 404 that
// leaves the connection idle in keep-alive) and hold them until the test
// ends. It returns how many got through.
func openIdle(t *testing.T, h *testenv.Host, addr string, n int) ([]*idleAttacker, int, time.Duration) {
	t.Helper()
	start := time.Now()
	var atks []*idleAttacker
	for i := 0; i < attackerProcs; i++ {
		share := n / attackerProcs
		if i < n%attackerProcs {
			share++
		}
		cmd := exec.Command("ip", "netns", "exec", h.NS, os.Args[0], "-test.run=^TestAttackIdleConnsHelper$", "-test.count=1")
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s,%d", attackerEnv, addr, share))
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		cmd.Stderr = os.Stderr
		in, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatalf("start the attacker: %v", err)
		}
		a := &idleAttacker{cmd: cmd, in: in, out: bufio.NewScanner(out)}
		t.Cleanup(func() {
			_ = a.in.Close()
			done := make(chan struct{})
			go func() { _ = a.cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = syscall.Kill(-a.cmd.Process.Pid, syscall.SIGKILL)
				<-done
			}
		})
		atks = append(atks, a)
	}
	total := 0
	for _, a := range atks {
		v, err := a.ask("")
		if err != nil {
			t.Fatalf("attacker: %v", err)
		}
		a.conns = v
		total += v
	}
	return atks, total, time.Since(start)
}

// ask sends cmd ("" for none) to the attacker and returns the number in
// its next line.
func (a *idleAttacker) ask(cmd string) (int, error) {
	if cmd != "" {
		if _, err := io.WriteString(a.in, cmd+"\n"); err != nil {
			return 0, err
		}
	}
	for a.out.Scan() {
		line := a.out.Text()
		if rest, ok := strings.CutPrefix(line, attackerPrefix); ok {
			var v int
			if _, err := fmt.Sscan(rest, &v); err != nil {
				return 0, fmt.Errorf("attacker said %q: %w", line, err)
			}
			return v, nil
		}
	}
	return 0, fmt.Errorf("attacker ended: %v", a.out.Err())
}

// stillOpenAll asks every attacker how many of its connections are open.
func stillOpenAll(atks []*idleAttacker) int {
	n := 0
	for _, a := range atks {
		v, _ := a.ask("count")
		n += v
	}
	return n
}

// TestAttackIdleConnsHelper is not a test: it is the attacker process of
// TestAttackIdleConns (run by it, skipped otherwise). It dials its share
// of connections, says how many got through, then answers "count" with how
// many the server has not closed, until its stdin closes.
func TestAttackIdleConnsHelper(t *testing.T) {
	job := os.Getenv(attackerEnv)
	if job == "" {
		t.Skip("the attacker process of TestAttackIdleConns")
	}
	addr, nStr, _ := strings.Cut(job, ",")
	var n int
	fmt.Sscan(nStr, &n)
	req := []byte("GET /pieces/idle/0 HTTP/1.1\r\nHost: " + addr + "\r\n\r\n")
	var mu sync.Mutex
	var conns []net.Conn
	const workers = 8
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		share := n / workers
		if w < n%workers {
			share++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := net.Dialer{Timeout: attackerTimeout}
			// A connection the server does not take within the timeout
			// counts as refused; a worker stops after 50 in a row.
			refused := 0
			for i := 0; i < share && refused < 50; i++ {
				c, err := d.Dial("tcp", addr)
				if err == nil {
					_ = c.SetWriteDeadline(time.Now().Add(attackerTimeout))
					if _, err = c.Write(req); err != nil {
						c.Close()
					}
				}
				if err != nil {
					refused++
					continue
				}
				refused = 0
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	fmt.Printf("%s %d\n", attackerPrefix, len(conns))
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if sc.Text() == "count" {
			fmt.Printf("%s %d\n", attackerPrefix, stillOpen(conns))
		}
	}
	for _, c := range conns {
		c.Close()
	}
}

// stillOpen counts the connections the server has not closed: each
// socket is drained without blocking (the 404 sits in its buffer) until it
// would block (open) or shows the end of the stream or a reset (closed).
func stillOpen(conns []net.Conn) int {
	open := 0
	buf := make([]byte, 4096)
	for _, c := range conns {
		tc, ok := c.(*net.TCPConn)
		if !ok {
			continue
		}
		rc, err := tc.SyscallConn()
		if err != nil {
			continue
		}
		isOpen := false
		_ = rc.Read(func(fd uintptr) bool {
			for {
				n, _, err := unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT)
				switch {
				case err == unix.EINTR:
					continue
				case err == unix.EAGAIN:
					isOpen = true
				case err == nil && n > 0:
					continue
				}
				return true
			}
		})
		if isOpen {
			open++
		}
	}
	return open
}

// hashBody reads r to the end: its length and "sha256:<hex>".
func hashBody(r io.Reader) (int64, string, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	return n, "sha256:" + hex.EncodeToString(h.Sum(nil)), err
}
