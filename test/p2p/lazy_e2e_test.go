package p2p_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/internal/testimage"
	"github.com/starling-dev/starling/pkg/registry"
	"github.com/starling-dev/starling/pkg/toc"
)

// Issue 10's real-network checks of lazy pulling through the P2P network:
// hosts in network namespaces, each lazy node with its own containerd and
// starlingd, a small busybox image converted by `starling convert`. They
// assert on outcomes (data, where the bytes came from), never on time.

// The account of the token-protected registry (docker-registry's htpasswd,
// basic auth). The hash is bcrypt at cost 4: docker-registry checks it on
// every request, and the usual cost would add tens of milliseconds to each.
const (
	regUser = "starling"
	regPass = "starling-pw"
	regHash = "$2b$04$R70dWqSjupVX8iQtHNi8aOqXTpi3qFndgGlQdX.fgE0i4syxGVH2m"
)

// lazyCluster is a cluster whose nodes run lazy containers.
type lazyCluster struct {
	*cluster
	lazy []*lazyNode
	// auth: the registry wants credentials; dockerConfig is then a
	// DOCKER_CONFIG directory holding them for both of its addresses (the
	// test's and the nodes').
	auth         bool
	dockerConfig string
	// cli is the starling binary.
	cli string
}

// newLazyCluster builds the network and starts the registry (behind the
// counting proxy; with basic auth when auth is set) and the scheduler.
func newLazyCluster(t *testing.T, prefix, rate string, auth bool) *lazyCluster {
	t.Helper()
	return newLazyClusterWith(t, prefix, rate, auth, false)
}

// newLazyClusterWith is newLazyCluster, with every daemon on mTLS when mtls
// is set.
func newLazyClusterWith(t *testing.T, prefix, rate string, auth, mtls bool) *lazyCluster {
	t.Helper()
	c := clusterBase(t, prefix, rate, "ip", "tc", "nsenter", "docker-registry", "containerd", "ctr", "runc")
	if auth {
		c.registry = testenv.StartAuthRegistry(t, regUser, regHash)
		// The set-ups with auth mean something only if the registry does
		// refuse anonymous pulls.
		resp, err := http.Get("http://" + c.registry.Addr + "/v2/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("the registry with auth answers an anonymous /v2/ with %s, want 401", resp.Status)
		}
	} else {
		c.registry = testenv.StartRegistry(t)
	}
	c.origin = testenv.ServeCountingProxy(t, c.regHost.Listen("tcp", c.regHost.IP+":5000"), c.registry.Addr)
	c.upstream = "http://" + c.regHost.IP + ":5000"
	c.schedHost = c.net.AddHost("sched")
	c.schedAddr = c.schedHost.IP + ":8002"
	c.initTLS(mtls)
	c.startScheduler()
	lc := &lazyCluster{cluster: c, auth: auth, cli: testenv.Bin(t, "starling")}
	if auth {
		lc.dockerConfig = writeDockerConfig(t, c.registry.Addr, c.regHost.IP+":5000")
	}
	return lc
}

// writeDockerConfig writes a DOCKER_CONFIG directory with the registry
// account for hosts.
func writeDockerConfig(t *testing.T, hosts ...string) string {
	t.Helper()
	dir := t.TempDir()
	cred := base64.StdEncoding.EncodeToString([]byte(regUser + ":" + regPass))
	auths := map[string]any{}
	for _, h := range hosts {
		auths[h] = map[string]string{"auth": cred}
	}
	b, err := json.Marshal(map[string]any{"auths": auths})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// starling runs the CLI on the test's own host (with the registry's
// credentials when it wants them).
func (c *lazyCluster) starling(args ...string) string {
	c.t.Helper()
	if c.auth {
		return testenv.Run(c.t, "env", append([]string{"DOCKER_CONFIG=" + c.dockerConfig, c.cli}, args...)...)
	}
	return testenv.Run(c.t, c.cli, args...)
}

// staticKeychain answers every registry with the test account; a registry
// without auth never asks for it.
type staticKeychain struct{}

func (staticKeychain) Resolve(authn.Resource) (authn.Authenticator, error) {
	return authn.FromConfig(authn.AuthConfig{Username: regUser, Password: regPass}), nil
}

// lazyNode is a starlingd on its own host and, unless it runs the peer
// alone, its snapshotter's containerd.
type lazyNode struct {
	*node
	lc   *lazyCluster
	ctd  *testenv.Containerd // nil for a peer alone
	sock string
	args []string
	// snapshotter: starlingd serves containerd's snapshots API on sock.
	snapshotter bool
	// dockerConfig is the node's DOCKER_CONFIG ("" for none).
	dockerConfig string
	// nofile, when not 0, is starlingd's RLIMIT_NOFILE (soft and hard).
	nofile int
}

// nodeOpts configures addLazyNode.
type nodeOpts struct {
	role        string // "peer" (default) or "seed"
	noScheduler bool   // lazy straight from the registry
	peerOnly    bool   // --snapshotter=false, no containerd
	noCreds     bool   // keep the registry's credentials from this node
	env         []string
	toml        string // more of starlingd's configuration
	logLevel    string // default STARLING_P2P_LOG_LEVEL, else debug
	nofile      int    // starlingd's RLIMIT_NOFILE (0: inherited)
}

// addLazyNode starts a node: its starlingd (snapshotter and peer, under
// nsenter --net so that the mounts it makes are the ones containerd sees)
// and its containerd. Everything stops, and every mount under the node's
// directory goes, when the test ends, also when it fails.
func (c *lazyCluster) addLazyNode(name string, o nodeOpts) *lazyNode {
	t := c.t
	t.Helper()
	if o.role == "" {
		o.role = "peer"
	}
	if o.logLevel == "" {
		o.logLevel = os.Getenv("STARLING_P2P_LOG_LEVEL")
	}
	if o.logLevel == "" {
		o.logLevel = "debug"
	}
	n := &node{c: c.cluster, name: name, host: c.net.AddHost(name), role: o.role, env: o.env}
	// containerd's and starlingd's paths end up in unix socket names.
	dir, err := os.MkdirTemp("/tmp", "sl-"+name+"-")
	if err != nil {
		t.Fatal(err)
	}
	n.root = dir
	t.Cleanup(func() {
		if n.proc != nil {
			n.proc.Stop()
		}
		testenv.UnmountUnder(dir)
		_ = os.RemoveAll(dir)
	})
	cfg := fmt.Sprintf("[fs]\nbackground_fetch = false\n[resolver.host.%q]\ninsecure = true\n", c.regHost.IP+":5000") + o.toml
	if err := os.WriteFile(filepath.Join(dir, "starlingd.toml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	n.client = n.host.HTTPClient()
	c.issueNode(n)
	c.mu.Lock()
	c.nodes = append(c.nodes, n)
	c.mu.Unlock()
	ln := &lazyNode{node: n, lc: c, sock: filepath.Join(dir, "sd.sock")}
	if c.auth && !o.noCreds {
		ln.dockerConfig = c.dockerConfig
		n.env = append(n.env, "DOCKER_CONFIG="+c.dockerConfig)
	}
	ip := n.host.IP
	ln.args = []string{"--config", filepath.Join(dir, "starlingd.toml"), "--root", filepath.Join(dir, "root"),
		"--role", o.role, "--log-level", o.logLevel,
		"--advertise-ip", ip, "--upload-listen", ip + ":" + uploadPort, "--proxy-listen", ip + ":" + proxyPort,
		"--metrics-listen", ip + ":" + metricsPort, "--health-listen", ip + ":" + healthPort}
	ln.snapshotter = !o.peerOnly
	if ln.snapshotter {
		ln.args = append(ln.args, "--address", ln.sock)
	} else {
		ln.args = append(ln.args, "--snapshotter=false")
	}
	if !o.noScheduler {
		ln.args = append(ln.args, "--scheduler", c.schedAddr)
	}
	ln.args = append(ln.args, c.securityFlags(n.cert)...)
	ln.nofile = o.nofile
	ln.start()
	if !o.peerOnly {
		ln.ctd = testenv.StartContainerd(t, testenv.ContainerdOptions{ProxySnapshotters: map[string]string{"starling": ln.sock}})
	}
	c.lazy = append(c.lazy, ln)
	return ln
}

// start runs the node's starlingd (again, after a kill: same root) and
// waits until it is healthy and, with the snapshotter on, serving.
func (n *lazyNode) start() {
	t := n.c.t
	t.Helper()
	// nsenter rather than `ip netns exec`: the latter gives the process a
	// mount namespace of its own, and containerd would not see the layers
	// starlingd mounts.
	cmd := []string{"--net=/run/netns/" + n.host.NS}
	if n.nofile > 0 {
		cmd = append(cmd, "prlimit", fmt.Sprintf("--nofile=%d:%d", n.nofile, n.nofile), "--")
	}
	n.proc = testenv.Start(t, n.name, n.env, "nsenter", append(append(cmd, n.c.starlingd), n.args...)...)
	n.c.mu.Lock()
	n.runs = append(n.runs, n.proc)
	n.c.mu.Unlock()
	testenv.WaitFor(t, 30*time.Second, n.name+" healthy", func() bool {
		if n.proc.Exited() {
			t.Fatalf("%s exited:\n%s", n.name, n.proc.Log())
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		resp, err := n.client.Do(mustRequest(ctx, "http://"+n.host.IP+":"+healthPort+"/healthy"))
		if err != nil {
			return false
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return false
		}
		if !n.snapshotter {
			return true
		}
		_, err = os.Stat(n.sock)
		return err == nil
	})
}

// pull pulls ref through the node's containerd with the starling
// snapshotter, from the node's own host as its kubelet would.
func (n *lazyNode) pull(ctx context.Context, ref string) error {
	args := []string{"netns", "exec", n.host.NS}
	if n.dockerConfig != "" {
		args = append(args, "env", "DOCKER_CONFIG="+n.dockerConfig)
	}
	args = append(args, n.lc.cli, "pull", "--plain-http", "--address", n.ctd.Address, ref)
	if out, err := testenv.RunErr(ctx, "ip", args...); err != nil {
		return fmt.Errorf("%s: pull %s: %w\n%s", n.name, ref, err, out)
	}
	return nil
}

var containerSeq atomic.Int64

// run runs cmd in a new container of ref (pulled already) and returns its
// output.
func (n *lazyNode) run(ctx context.Context, ref string, cmd ...string) (string, error) {
	id := fmt.Sprintf("%s-%d", n.name, containerSeq.Add(1))
	out, err := n.ctd.Ctr(ctx, append([]string{"run", "--rm", "--snapshotter", "starling", ref, id}, cmd...)...)
	if err != nil {
		return out, fmt.Errorf("%s: run %v: %w\n%s", n.name, cmd, err, out)
	}
	return out, nil
}

// checkLazy fails the test unless every layer the node mounted was mounted
// lazily: a layer that went the ordinary way (a TOC that did not match,
// say) would make the node's reads say nothing about the lazy path.
func (n *lazyNode) checkLazy(t *testing.T, layers int) {
	t.Helper()
	remote, err := n.metric("starling_snapshot_remote_total")
	if err != nil {
		t.Errorf("%s: %v", n.name, err)
		return
	}
	fallback, _ := n.metric("starling_snapshot_fallback_total")
	if int(remote) < layers || fallback > 0 {
		t.Errorf("%s: %v layers mounted lazily and %v downloaded and unpacked; want all %d lazily", n.name, remote, fallback, layers)
	}
}

// testImage is the image the lazy tests run: busybox and a data layer,
// converted to eStargz by `starling convert` in 256 KiB chunks.
type testImage struct {
	ref    string            // as the nodes reach it
	layers []v1.Descriptor   // eStargz layers, base first
	sums   map[string]string // data file (no leading /) -> sha256 hex
	tocs   []*toc.Index      // of each layer
}

// The data layer's files: small text files, files of a couple of chunks
// and files of eight.
var (
	smallFiles = []string{"data/small/s0", "data/small/s1", "data/small/s2", "data/small/s3"}
	midFiles   = []string{"data/m/m0", "data/m/m1", "data/m/m2", "data/m/m3", "data/m/m4", "data/m/m5"}
	bigFiles   = []string{"data/big/b0", "data/big/b1", "data/big/b2", "data/big/b3"}
)

const e2eChunk = 256 << 10

// pushImage builds the test image, pushes it to the registry (directly, not
// through the counting proxy) and converts it with `starling convert`.
func (c *lazyCluster) pushImage() *testImage {
	t := c.t
	t.Helper()
	bb, err := testimage.BusyboxLayer()
	if err != nil {
		t.Skipf("needs a static /bin/busybox: %v", err)
	}
	im := &testImage{sums: map[string]string{}}
	data := testimage.Layer{
		{Name: "data/", Type: '5', Mode: 0o755},
		{Name: "data/small/", Type: '5', Mode: 0o755},
		{Name: "data/m/", Type: '5', Mode: 0o755},
		{Name: "data/big/", Type: '5', Mode: 0o755},
	}
	add := func(name string, b []byte) {
		data = append(data, testimage.Entry{Name: name, Type: '0', Mode: 0o644, Data: b})
		s := sha256.Sum256(b)
		im.sums[name] = hex.EncodeToString(s[:])
	}
	for i, f := range smallFiles {
		add(f, bytes.Repeat([]byte(fmt.Sprintf("small file %d\n", i)), 100*(i+1)))
	}
	for i, f := range midFiles {
		add(f, testimage.Random(uint64(200+i), e2eChunk+e2eChunk/2))
	}
	for i, f := range bigFiles {
		add(f, testimage.Random(uint64(300+i), 8*e2eChunk))
	}
	img, err := testimage.Image(bb, data)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rc := registry.New(registry.DefaultConfig(), registry.WithKeychain(staticKeychain{}))
	direct := c.registry.Addr + "/e2e"
	gz, err := rc.ParseReference(direct + ":gz")
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.Write(ctx, gz, img); err != nil {
		t.Fatalf("push the test image: %v", err)
	}
	c.starling("convert", "--chunk-size", fmt.Sprint(e2eChunk), direct+":gz", direct+":esgz")
	im.ref = c.regHost.IP + ":5000/e2e:esgz"
	im.layers, im.tocs = c.lazyLayers(ctx, rc, direct+":esgz")
	return im
}

// lazyLayers reads the manifest of ref (on the registry's direct address)
// and the TOC of each of its layers.
func (c *lazyCluster) lazyLayers(ctx context.Context, rc *registry.Client, ref string) ([]v1.Descriptor, []*toc.Index) {
	t := c.t
	t.Helper()
	r, err := rc.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	img, err := rc.Image(ctx, r, nil)
	if err != nil {
		t.Fatalf("%s: %v", ref, err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	var tocs []*toc.Index
	for _, d := range m.Layers {
		l, err := img.LayerByDigest(d.Digest)
		if err != nil {
			t.Fatal(err)
		}
		rd, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(rd)
		rd.Close()
		if err != nil {
			t.Fatalf("read layer %s: %v", d.Digest, err)
		}
		ix, err := toc.Load(bytes.NewReader(b), int64(len(b)), new(estargz.GzipDecompressor), toc.Limits{})
		if err != nil {
			t.Fatalf("TOC of layer %s: %v", d.Digest, err)
		}
		tocs = append(tocs, ix)
	}
	return m.Layers, tocs
}

// needed is what a cold read of paths (whole files) needs from the
// registry at most: a request per distinct compressed stream of their
// chunks, plus one per layer for its footer and TOC; and those streams'
// bytes plus each layer's tail that holds the TOC (the last 256 KiB, as
// pkg/layer reads it, or the whole TOC if that is larger).
func (im *testImage) needed(t *testing.T, paths ...string) (requests int, bytes int64) {
	t.Helper()
	type stream struct{ layer, off, end int64 }
	seen := map[stream]bool{}
	for _, p := range paths {
		found := false
		for i, ix := range im.tocs {
			e, ok := ix.Lookup(p)
			if !ok || e.Type != "reg" {
				continue
			}
			found = true
			for _, ch := range e.Chunks {
				seen[stream{int64(i), ch.Offset, ch.End}] = true
			}
		}
		if !found {
			t.Fatalf("%s: no such file in the image", p)
		}
	}
	for s := range seen {
		bytes += s.end - s.off
	}
	for _, ix := range im.tocs {
		bytes += min(ix.BlobSize, max(256<<10, ix.BlobSize-ix.TOCOffset))
	}
	return len(seen) + len(im.layers), bytes
}

// waitQuiet waits until the registry has sent nothing for a second (at
// most 30 s), so that work still running after a phase (pieces completed
// in the background, say) is not counted against the next one.
func (c *lazyCluster) waitQuiet() {
	last, still := c.origin.BytesServed(), 0
	for i := 0; i < 300 && still < 10; i++ {
		time.Sleep(100 * time.Millisecond)
		if n := c.origin.BytesServed(); n != last {
			last, still = n, 0
		} else {
			still++
		}
	}
}

// layerGets is every GET of the image's layers the registry has answered
// since the counters were last reset: their number and a line per layer.
func (im *testImage) layerGets(p *testenv.CountingProxy) (int, string) {
	var n int
	var b strings.Builder
	for i, d := range im.layers {
		g := p.BlobGets(d.Digest.String())
		n += len(g)
		fmt.Fprintf(&b, "\n  layer %d %s: %d GETs, %d bytes: %s", i, d.Digest.String()[:19], len(g), p.BlobBytes(d.Digest.String()), strings.Join(g, " "))
	}
	return n, b.String()
}

// layerBytes is the body bytes the registry sent of the image's layers.
func (im *testImage) layerBytes(p *testenv.CountingProxy) int64 {
	var n int64
	for _, d := range im.layers {
		n += p.BlobBytes(d.Digest.String())
	}
	return n
}

// sumCmd is the container command that hashes paths.
func sumCmd(paths []string) []string {
	cmd := []string{"/bin/sha256sum"}
	for _, p := range paths {
		cmd = append(cmd, "/"+p)
	}
	return cmd
}

// checkSums reports an error unless out, sha256sum's output, gives every
// one of paths its right hash.
func (im *testImage) checkSums(out string, paths []string) error {
	got := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) == 2 {
			got[strings.TrimPrefix(f[1], "/")] = f[0]
		}
	}
	var bad []string
	for _, p := range paths {
		if got[p] != im.sums[p] {
			bad = append(bad, fmt.Sprintf("%s: got %q, want %s", p, got[p], im.sums[p]))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("wrong contents:\n  %s\noutput:\n%s", strings.Join(bad, "\n  "), out)
	}
	return nil
}

// coldRead pulls the image on n and hashes paths in a container.
func (n *lazyNode) coldRead(ctx context.Context, im *testImage, paths []string) error {
	if err := n.pull(ctx, im.ref); err != nil {
		return err
	}
	out, err := n.run(ctx, im.ref, sumCmd(paths)...)
	if err != nil {
		return err
	}
	if err := im.checkSums(out, paths); err != nil {
		return fmt.Errorf("%s: %w", n.name, err)
	}
	return nil
}

// allData is every file of the data layer.
func allData() []string {
	return append(append(append([]string(nil), smallFiles...), midFiles...), bigFiles...)
}

// TestLazyP2PCluster: a scheduler, a seed and three nodes start the same
// image lazily at once. All of them read the right bytes; the registry
// answers at most one GET per distinct chunk stream the reads need (plus
// each layer's TOC), so concurrent readers did not each fetch the same
// bytes; a fourth node afterwards takes nothing of the layers from the
// registry. Once with an open registry, once with one that wants
// credentials, which the nodes have and the seed does not; and that one
// again with every daemon on mutual TLS (issue 11): the same bounds hold.
func TestLazyP2PCluster(t *testing.T) {
	t.Run("open", func(t *testing.T) { testLazyP2PCluster(t, "lze", false, false) })
	t.Run("auth", func(t *testing.T) { testLazyP2PCluster(t, "lza", true, false) })
	t.Run("mtls", func(t *testing.T) { testLazyP2PCluster(t, "lzm", true, true) })
}

func testLazyP2PCluster(t *testing.T, prefix string, auth, mtls bool) {
	c := newLazyClusterWith(t, prefix, "100mbit", auth, mtls)
	im := c.pushImage()
	c.addLazyNode("seed", nodeOpts{role: "seed", peerOnly: true, noCreds: true})
	nodes := []*lazyNode{c.addLazyNode("n1", nodeOpts{}), c.addLazyNode("n2", nodeOpts{}), c.addLazyNode("n3", nodeOpts{})}
	read := []string{"data/small/s0", "data/m/m0", "data/m/m1", "data/big/b0"}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	c.origin.Reset()
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs[i] = n.coldRead(ctx, im, read)
		}()
	}
	close(start)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range nodes {
		n.checkLazy(t, len(im.layers))
	}
	gets, detail := im.layerGets(c.origin)
	sent := im.layerBytes(c.origin)
	need, needBytes := im.needed(t, append([]string{"bin/busybox"}, read...)...)
	t.Logf("three nodes at once: the registry answered %d GETs of the layers with %d bytes; the reads need at most %d GETs and %d bytes%s",
		gets, sent, need, needBytes, detail)
	if gets > need {
		t.Errorf("the registry answered %d GETs of the layers; the reads need at most %d (distinct chunk streams plus a TOC per layer)", gets, need)
	}
	// The issue's bound on bytes (the bench's "registry sends at most 1.05
	// times what one node alone takes"): needBytes is exactly what one
	// node alone takes.
	if float64(sent) > 1.05*float64(needBytes) {
		t.Errorf("the registry sent %d bytes of the layers, %.2f times what the reads need (%d); want at most 1.05", sent, float64(sent)/float64(needBytes), needBytes)
	}

	c.waitQuiet()
	fourth := c.addLazyNode("n4", nodeOpts{})
	c.origin.Reset()
	if err := fourth.coldRead(ctx, im, read); err != nil {
		t.Fatal(err)
	}
	fourth.checkLazy(t, len(im.layers))
	gets, detail = im.layerGets(c.origin)
	t.Logf("fourth node: %d GETs of the layers, %d bytes of them, %d bytes in all (manifest and config go to the registry directly)%s",
		gets, im.layerBytes(c.origin), c.origin.BytesServed(), detail)
	t.Logf("fourth node's bytes by source: %v", fourth.sources())
	if gets > 0 || im.layerBytes(c.origin) > 0 {
		t.Errorf("the fourth node took %d bytes of the layers from the registry in %d GETs; want none", im.layerBytes(c.origin), gets)
	}
}

// TestLazyP2PParentKilled: node B reads files whose chunks only node A
// holds; A's starlingd and the scheduler are SIGKILLed while B's container
// is reading them from A. B's reads complete with the right bytes from the
// registry directly. Once A and the scheduler are back, B's reads of
// files it has not read yet come from A again: the registry sends nothing
// of them.
func TestLazyP2PParentKilled(t *testing.T) {
	// A slow link, so that B is still reading when A dies.
	c := newLazyCluster(t, "lzk", "40mbit", false)
	im := c.pushImage()
	// A short breaker, so that B tries the peer again soon after.
	const breaker = 2 * time.Second
	cfg := fmt.Sprintf("[peer]\nlazy_fallback_for = %q\n", breaker.String())
	a := c.addLazyNode("a", nodeOpts{toml: cfg})
	b := c.addLazyNode("b", nodeOpts{toml: cfg})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// A reads everything; no seed: A is the only node holding the chunks.
	if err := a.coldRead(ctx, im, allData()); err != nil {
		t.Fatal(err)
	}
	a.checkLazy(t, len(im.layers))
	if err := b.pull(ctx, im.ref); err != nil {
		t.Fatal(err)
	}

	// B reads the big files. The container says when it starts reading
	// them; A and the scheduler die as soon as B has bytes of them from A
	// (its status counts bytes by source, else A counts its uploads), so
	// that reads through A are in flight.
	c.origin.Reset()
	cmd := exec.CommandContext(ctx, "ctr", "--address", b.ctd.Address, "run", "--rm", "--snapshotter", "starling", im.ref, "b-killed",
		"/bin/sh", "-c", "echo reading; exec "+strings.Join(sumCmd(bigFiles), " "))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	reading, ended := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(ended)
		sc := bufio.NewScanner(stdout)
		seen := false
		for sc.Scan() {
			out.WriteString(sc.Text() + "\n")
			if !seen && strings.TrimSpace(sc.Text()) == "reading" {
				seen = true
				close(reading)
			}
		}
	}()
	select {
	case <-reading:
	case <-ended:
	}
	before := b.sources()
	upBefore, _ := a.metric("starling_peer_upload_bytes_total")
	fromA := func() float64 {
		if s := b.sources(); s != nil {
			return float64(s["peer"] - before["peer"])
		}
		up, _ := a.metric("starling_peer_upload_bytes_total")
		return up - upBefore
	}
	var got float64
	deadline := time.Now().Add(10 * time.Second)
	for got == 0 && time.Now().Before(deadline) {
		select {
		case <-ended:
			deadline = time.Now()
		case <-time.After(20 * time.Millisecond):
		}
		got = fromA()
	}
	a.proc.Kill()
	c.sched.Kill()
	select {
	case <-ended:
		t.Errorf("B's container ended before A was killed; the kill was not mid-read:\n%s", out.String())
	default:
		t.Logf("A and the scheduler killed after B got %.0f bytes of the big files from A", got)
		if got == 0 {
			t.Errorf("B got nothing of the big files from A within 10 s: the kill was not mid-read")
		}
	}
	<-ended
	if err := cmd.Wait(); err != nil {
		t.Fatalf("B's reads with A and the scheduler dead: %v\n%s", err, out.String())
	}
	if err := im.checkSums(out.String(), bigFiles); err != nil {
		t.Fatalf("B's reads with A and the scheduler dead: %v", err)
	}
	direct := im.layerBytes(c.origin)
	gets, detail := im.layerGets(c.origin)
	t.Logf("B's reads with A dead: the registry sent %d bytes of the layers in %d GETs%s", direct, gets, detail)
	if direct == 0 {
		t.Errorf("the registry sent nothing while A was dead: B cannot have read the big files through it")
	}
	t.Logf("B's bytes by source since it started reading the big files: %v", delta(before, b.sources()))

	// A and the scheduler come back.
	c.startScheduler()
	a.start()
	for _, n := range []*lazyNode{a, b} {
		testenv.WaitFor(t, 30*time.Second, n.name+" back at the scheduler", func() bool {
			v, err := n.metric("starling_peer_scheduler_up")
			return err == nil && v == 1
		})
	}
	// The breakers B opened close after `breaker`; the announces (every
	// second) have told the new scheduler what A holds by then.
	time.Sleep(breaker + 2*time.Second)
	c.waitQuiet()
	c.origin.Reset()
	before = b.sources()
	rest := append(append([]string(nil), midFiles...), smallFiles...)
	out2, err := b.run(ctx, im.ref, sumCmd(rest)...)
	if err != nil {
		t.Fatal(err)
	}
	if err := im.checkSums(out2, rest); err != nil {
		t.Fatalf("B's reads after A came back: %v", err)
	}
	gets, detail = im.layerGets(c.origin)
	t.Logf("B's reads after A and the scheduler came back: the registry sent %d bytes of the layers in %d GETs%s",
		im.layerBytes(c.origin), gets, detail)
	if gets > 0 {
		t.Errorf("after A and the scheduler came back, B took %d bytes of chunks A holds from the registry in %d GETs; want all from A",
			im.layerBytes(c.origin), gets)
	}
	// Where status says where bytes came from, they came from a peer: B
	// had read none of these files, and only A holds them.
	if after := b.sources(); after != nil {
		d := delta(before, after)
		t.Logf("B's bytes by source after A came back: %v", d)
		if d["peer"] == 0 {
			t.Errorf("after A and the scheduler came back, B's status shows no bytes from peers for files only A holds: %v", d)
		}
	}
	b.checkLazy(t, len(im.layers))
}

// TestLazyP2PCorruptParent: node A, the only holder of the image's chunks,
// corrupts everything it uploads (STARLING_TEST_CORRUPT_UPLOADS=1). Node B
// reads every file lazily and gets the right bytes: each bad chunk is
// caught by its digest and fetched again from another source.
func TestLazyP2PCorruptParent(t *testing.T) {
	c := newLazyCluster(t, "lzc", "100mbit", false)
	im := c.pushImage()
	a := c.addLazyNode("a", nodeOpts{env: []string{"STARLING_TEST_CORRUPT_UPLOADS=1"}})
	b := c.addLazyNode("b", nodeOpts{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := a.coldRead(ctx, im, allData()); err != nil {
		t.Fatal(err)
	}
	a.checkLazy(t, len(im.layers))
	base, _ := a.metric("starling_peer_upload_bytes_total")
	c.waitQuiet()
	c.origin.Reset()
	if err := b.coldRead(ctx, im, allData()); err != nil {
		t.Fatal(err)
	}
	b.checkLazy(t, len(im.layers))
	up, _ := a.metric("starling_peer_upload_bytes_total")
	// Whether corrupted bytes reached B at all: A counted an upload, or B
	// caught a bad chunk or piece, or read a range directly because of one.
	caught := 0.0
	var counters []string
	for _, m := range []string{"starling_chunk_verify_failures_total", "starling_peer_bad_pieces_total",
		"starling_peer_lazy_fallback_total", "starling_peer_lazy_direct_reads_total"} {
		s, err := b.samples(m)
		if err != nil {
			continue
		}
		keys := make([]string, 0, len(s))
		for k := range s {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			counters = append(counters, fmt.Sprintf("%s%s=%v", m, k, s[k]))
			if m == "starling_chunk_verify_failures_total" || m == "starling_peer_bad_pieces_total" || strings.Contains(k, `"corrupt"`) {
				caught += s[k]
			}
		}
	}
	t.Logf("A uploaded %v bytes, all corrupted, to B; the registry sent %d bytes of the layers; B: %s; B's bytes by source: %v",
		up-base, im.layerBytes(c.origin), strings.Join(counters, " "), b.sources())
	if up-base <= 0 && caught == 0 {
		t.Errorf("no corrupted byte reached B (A counted no upload, B caught nothing): the test proved nothing")
	}
}

// status is the node's `starling status` as JSON ("" when it has none).
func (n *lazyNode) status() string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := n.client.Do(mustRequest(ctx, "http://"+n.host.IP+":"+healthPort+"/status"))
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return strings.TrimSpace(string(b))
}

// delta is after minus before, per source.
func delta(before, after map[string]int64) map[string]int64 {
	d := map[string]int64{}
	for k, v := range after {
		d[k] = v - before[k]
	}
	return d
}

// sources sums, over the node's lazy layers, the blob bytes `starling
// status` says came from each source ("local", "peer", "origin"; "cache"
// is chunk store hits); nil when the status has no sources.
func (n *lazyNode) sources() map[string]int64 {
	var st struct {
		Layers []struct {
			Stats struct {
				Sources map[string]struct {
					Bytes int64 `json:"bytes"`
				} `json:"sources"`
			} `json:"stats"`
		} `json:"layers"`
	}
	if err := json.Unmarshal([]byte(n.status()), &st); err != nil {
		return nil
	}
	var out map[string]int64
	for _, l := range st.Layers {
		for k, v := range l.Stats.Sources {
			if out == nil {
				out = map[string]int64{}
			}
			out[k] += v.Bytes
		}
	}
	return out
}

// mustRequest is a GET of url bound by ctx.
func mustRequest(ctx context.Context, url string) *http.Request {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		panic(err)
	}
	return req
}
