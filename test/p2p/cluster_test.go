// Package p2p_test runs starling's P2P network the way a cluster runs it: a
// registry, a scheduler, a seed peer and peers, each on its own host (a
// network namespace) behind a link limited with tbf, all on one machine.
package p2p_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/starling-dev/starling/internal/testenv"
)

// Ports every starlingd of the cluster uses on its own host.
const (
	uploadPort  = "4000"
	proxyPort   = "4001"
	metricsPort = "4002"
	healthPort  = "4003"
)

// cluster is a registry host (docker-registry behind a counting proxy on
// REGISTRY:5000), a scheduler host and any number of starlingd hosts.
type cluster struct {
	t   *testing.T
	net *testenv.Network

	regHost *testenv.Host
	// registry is docker-registry itself; only the test pushes to it
	// directly. Peers reach it through origin, the counting proxy that
	// listens in the registry host's namespace, so every byte they get from
	// the registry crosses the registry host's shaped link and is counted.
	registry *testenv.Registry
	origin   *testenv.CountingProxy
	// upstream is the X-Dragonfly-Registry value: http://REGISTRY:5000.
	upstream string

	schedHost *testenv.Host
	sched     *testenv.Proc
	schedRuns []*testenv.Proc
	schedAddr string

	starlingd, scheduler string

	// tls is the cluster's CA when its daemons talk mTLS (nil: plaintext);
	// schedCert the scheduler's certificate then.
	tls       *clusterTLS
	schedCert *nodeCert

	mu    sync.Mutex
	nodes []*node
}

// node is one starlingd on its own host.
type node struct {
	c    *cluster
	name string
	host *testenv.Host
	role string
	root string
	env  []string
	// cert is the node's identity when the cluster runs mTLS.
	cert *nodeCert
	proc *testenv.Proc
	// runs holds every process the node has had (restarts), for the logs.
	runs   []*testenv.Proc
	client *http.Client
}

// newCluster builds the network and starts the registry and the scheduler.
func newCluster(t *testing.T, prefix, rate string) *cluster {
	t.Helper()
	return newClusterWith(t, prefix, rate, false)
}

// clusterBase is a network with a registry host and the binaries, the
// part every cluster of these tests starts from; tools are what the test
// needs installed.
func clusterBase(t *testing.T, prefix, rate string, tools ...string) *cluster {
	t.Helper()
	testenv.Require(t, tools...)
	c := &cluster{
		t:         t,
		net:       testenv.NewNetwork(t, prefix, rate),
		starlingd: testenv.Bin(t, "starlingd"),
		scheduler: testenv.Bin(t, "starling-scheduler"),
	}
	// The logs live in t.TempDir(); its removal, registered on its first
	// use, must run after keepLogsOnFailure has copied them.
	_ = t.TempDir()
	t.Cleanup(c.keepLogsOnFailure)
	c.regHost = c.net.AddHost("registry")
	return c
}

// newClusterWith is newCluster, with every daemon on mTLS when mtls is set.
func newClusterWith(t *testing.T, prefix, rate string, mtls bool) *cluster {
	t.Helper()
	c := clusterBase(t, prefix, rate, "ip", "tc", "docker-registry")
	c.registry = testenv.StartRegistry(t)
	c.origin = testenv.ServeCountingProxy(t, c.regHost.Listen("tcp", c.regHost.IP+":5000"), c.registry.Addr)
	c.upstream = "http://" + c.regHost.IP + ":5000"

	c.schedHost = c.net.AddHost("sched")
	c.schedAddr = c.schedHost.IP + ":8002"
	c.initTLS(mtls)
	c.startScheduler()
	return c
}

// initTLS makes the cluster's CA and the scheduler's certificate when mtls
// is set.
func (c *cluster) initTLS(mtls bool) {
	c.t.Helper()
	if !mtls {
		return
	}
	c.tls = newClusterTLS(c.t)
	nc := c.tls.issue("scheduler", c.schedHost.IP, certScheduler)
	c.schedCert = &nc
}

// issueNode gives a node of the cluster its certificate when it runs mTLS.
func (c *cluster) issueNode(n *node) {
	c.t.Helper()
	if c.tls == nil {
		return
	}
	kind := certPeer
	if n.role == "seed" {
		kind = certSeed
	}
	nc := c.tls.issue(n.name, n.host.IP, kind)
	n.cert = &nc
}

func (c *cluster) startScheduler() {
	c.t.Helper()
	// An empty configuration file, so nothing from /etc/starling leaks in.
	cfg := filepath.Join(c.t.TempDir(), "scheduler.toml")
	// STARLING_P2P_SCHEDULER_TOML adds settings, for tuning experiments.
	if err := os.WriteFile(cfg, []byte(os.Getenv("STARLING_P2P_SCHEDULER_TOML")), 0o644); err != nil {
		c.t.Fatal(err)
	}
	args := append([]string{"--config", cfg, "--log-level", "debug",
		"--listen", c.schedAddr, "--http", c.schedHost.IP + ":8080"}, c.securityFlags(c.schedCert)...)
	c.sched = c.schedHost.Start(c.t, "scheduler", nil, c.scheduler, args...)
	c.mu.Lock()
	c.schedRuns = append(c.schedRuns, c.sched)
	c.mu.Unlock()
	c.schedHost.WaitTCP(c.t, c.sched, c.schedAddr, 30*time.Second)
}

// addNode starts a starlingd (role "peer" or "seed") on a new host and waits
// until it is healthy and its proxy answers.
func (c *cluster) addNode(name, role string, env ...string) *node {
	c.t.Helper()
	n := &node{c: c, name: name, host: c.net.AddHost(name), role: role, env: env}
	dir, err := os.MkdirTemp("", "starling-"+name+"-")
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { _ = os.RemoveAll(dir) })
	n.root = dir
	// A configuration file of its own, so nothing from /etc/starling leaks
	// in; the registry is plain HTTP.
	// STARLING_P2P_PEER_TOML adds settings, for tuning experiments.
	cfg := os.Getenv("STARLING_P2P_PEER_TOML") + "\n" + fmt.Sprintf("[resolver.host.%q]\ninsecure = true\n", c.regHost.IP+":5000")
	if err := os.WriteFile(filepath.Join(dir, "starlingd.toml"), []byte(cfg), 0o644); err != nil {
		c.t.Fatal(err)
	}
	n.client = n.host.HTTPClient()
	c.issueNode(n)
	c.mu.Lock()
	c.nodes = append(c.nodes, n)
	c.mu.Unlock()
	n.start()
	return n
}

// start runs the node's starlingd (again, after a kill: same root).
func (n *node) start() {
	t := n.c.t
	t.Helper()
	ip := n.host.IP
	args := []string{"--config", filepath.Join(n.root, "starlingd.toml"),
		"--snapshotter=false",
		"--role", n.role,
		"--root", n.root,
		"--log-level", "debug",
		"--scheduler", n.c.schedAddr,
		"--advertise-ip", ip,
		"--upload-listen", ip + ":" + uploadPort,
		"--proxy-listen", ip + ":" + proxyPort,
		"--metrics-listen", ip + ":" + metricsPort,
		"--health-listen", ip + ":" + healthPort,
	}
	n.proc = n.host.Start(t, n.name, n.env, n.c.starlingd, append(args, n.c.securityFlags(n.cert)...)...)
	n.c.mu.Lock()
	n.runs = append(n.runs, n.proc)
	n.c.mu.Unlock()
	testenv.WaitFor(t, 30*time.Second, n.name+" healthy", func() bool {
		if n.proc.Exited() {
			t.Fatalf("%s exited:\n%s", n.name, n.proc.Log())
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+ip+":"+healthPort+"/healthy", nil)
		resp, err := n.client.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	n.host.WaitTCP(t, n.proc, ip+":"+proxyPort, 10*time.Second)
}

// keepLogsOnFailure copies every log of a failed test to a directory that
// outlives it (StartIn prints only their tails).
func (c *cluster) keepLogsOnFailure() {
	if !c.t.Failed() && os.Getenv("STARLING_P2P_KEEP_LOGS") == "" {
		return
	}
	dir, err := os.MkdirTemp("", "starling-p2p-logs-")
	if err != nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	procs := map[string]*testenv.Proc{}
	if c.registry != nil {
		procs["registry"] = c.registry.Proc
	}
	add := func(name string, runs []*testenv.Proc) {
		for i, p := range runs {
			if i > 0 {
				procs[fmt.Sprintf("%s.restart%d", name, i)] = p
			} else {
				procs[name] = p
			}
		}
	}
	add("scheduler", c.schedRuns)
	for _, n := range c.nodes {
		add(n.name, n.runs)
	}
	for name, p := range procs {
		if p != nil {
			_ = os.WriteFile(filepath.Join(dir, name+".log"), []byte(p.Log()), 0o644)
		}
	}
	c.t.Logf("logs of every process: %s", dir)
}

// blob is test content in the registry.
type blob struct {
	repo   string
	digest string // sha256:<hex>
	data   []byte
}

func (b blob) size() int64 { return int64(len(b.data)) }

// pushBlob uploads size random bytes (from seed) to repo, straight to
// docker-registry (not through the counting proxy).
func (c *cluster) pushBlob(repo string, size int, seed uint64) blob {
	c.t.Helper()
	data := make([]byte, size)
	var key [32]byte
	key[0], key[1] = byte(seed), byte(seed>>8)
	r := rand.NewChaCha8(key)
	_, _ = r.Read(data)
	sum := sha256.Sum256(data)
	b := blob{repo: repo, digest: "sha256:" + hex.EncodeToString(sum[:]), data: data}

	base := "http://" + c.registry.Addr
	resp, err := http.Post(base+"/v2/"+repo+"/blobs/uploads/", "", nil)
	if err != nil {
		c.t.Fatalf("start upload: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		c.t.Fatalf("start upload: %s", resp.Status)
	}
	loc := resp.Header.Get("Location")
	if !strings.HasPrefix(loc, "http") {
		loc = base + loc
	}
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	req, _ := http.NewRequest(http.MethodPut, loc+sep+"digest="+b.digest, bytes.NewReader(data))
	req.ContentLength = int64(size)
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatalf("upload: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		c.t.Fatalf("upload: %s", resp.Status)
	}
	return b
}

// blobRequest is a mirror request for b through the node's proxy, from the
// node's own host, as containerd on that host would send it.
func (n *node) blobRequest(ctx context.Context, b blob) *http.Request {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet,
		"http://"+n.host.IP+":"+proxyPort+"/v2/"+b.repo+"/blobs/"+b.digest, nil)
	req.Header.Set("X-Dragonfly-Registry", n.c.upstream)
	return req
}

// fetchResult is one node's download of a blob.
type fetchResult struct {
	node    *node
	digest  string
	n       int64
	elapsed time.Duration
	err     error
}

// progress follows a download as it runs.
type progress struct {
	bytes atomic.Int64
	done  atomic.Bool
}

// fetch downloads b through the node's proxy and hashes it; prog, when not
// nil, follows it.
func (n *node) fetch(ctx context.Context, b blob, prog *progress) fetchResult {
	start := time.Now()
	res := fetchResult{node: n}
	if prog != nil {
		defer prog.done.Store(true)
	}
	resp, err := n.client.Do(n.blobRequest(ctx, b))
	if err != nil {
		res.err = err
		res.elapsed = time.Since(start)
		return res
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		res.err = fmt.Errorf("%s: %s", resp.Status, body)
		res.elapsed = time.Since(start)
		return res
	}
	h := sha256.New()
	var w io.Writer = h
	if prog != nil {
		w = io.MultiWriter(h, counter{&prog.bytes})
	}
	res.n, res.err = io.Copy(w, resp.Body)
	res.digest = "sha256:" + hex.EncodeToString(h.Sum(nil))
	res.elapsed = time.Since(start)
	return res
}

type counter struct{ n *atomic.Int64 }

func (c counter) Write(p []byte) (int, error) { c.n.Add(int64(len(p))); return len(p), nil }

// fetchAll has every node fetch b at once and returns their results in the
// order of nodes; progs[i], when progs is not nil, follows node i's download.
func fetchAll(ctx context.Context, nodes []*node, b blob, progs []*progress) []fetchResult {
	res := make([]fetchResult, len(nodes))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var p *progress
			if progs != nil {
				p = progs[i]
			}
			<-start
			res[i] = n.fetch(ctx, b, p)
		}()
	}
	close(start)
	wg.Wait()
	return res
}

// checkAll fails the test unless every result is the whole blob.
func checkAll(t *testing.T, b blob, res []fetchResult) {
	t.Helper()
	for _, r := range res {
		switch {
		case r.err != nil:
			t.Errorf("%s: after %d bytes, %.1f s: %v", r.node.name, r.n, r.elapsed.Seconds(), r.err)
		case r.n != b.size() || r.digest != b.digest:
			t.Errorf("%s: got %d bytes with digest %s, want %d bytes with %s", r.node.name, r.n, r.digest, b.size(), b.digest)
		}
	}
}

// slowest is the longest download time of res.
func slowest(res []fetchResult) time.Duration {
	var d time.Duration
	for _, r := range res {
		d = max(d, r.elapsed)
	}
	return d
}

// metric scrapes a sample from the node's /metrics: the sum over the
// samples of the family name whose labels contain every one of labels
// (`source="origin"`); an unlabelled metric is its one sample.
func (n *node) metric(name string, labels ...string) (float64, error) {
	samples, err := n.samples(name)
	if err != nil {
		return 0, err
	}
	var sum float64
	found := false
	for l, v := range samples {
		if containsAll(l, labels) {
			sum += v
			found = true
		}
	}
	if !found {
		return 0, fmt.Errorf("%s: no metric %s%v", n.name, name, labels)
	}
	return sum, nil
}

// samples scrapes the family name from the node's /metrics, keyed by label
// set ("{reason=\"scheduled\"}", "" for none).
func (n *node) samples(name string) (map[string]float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+n.host.IP+":"+metricsPort+"/metrics", nil)
	resp, err := n.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", n.name, err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, name)
		if !ok || rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		labels, value := "", strings.TrimSpace(rest)
		if rest[0] == '{' {
			i := strings.LastIndexByte(rest, '}')
			if i < 0 {
				return nil, fmt.Errorf("%s on %s: %q: no closing brace", name, n.name, line)
			}
			labels, value = rest[:i+1], strings.TrimSpace(rest[i+1:])
		}
		v, err := strconv.ParseFloat(strings.Fields(value)[0], 64)
		if err != nil {
			return nil, fmt.Errorf("%s on %s: %q: %w", name, n.name, line, err)
		}
		out[labels] = v
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("scrape %s: %w", n.name, err)
	}
	return out, nil
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

// ratio is origin bytes of b per blob size.
func (c *cluster) ratio(b blob) float64 {
	return float64(c.origin.BlobBytes(b.digest)) / float64(b.size())
}
