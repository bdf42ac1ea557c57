package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/piece"
	"github.com/starling-dev/starling/pkg/progress"
	"github.com/starling-dev/starling/pkg/registry"
	"github.com/starling-dev/starling/pkg/scheduler"
	"github.com/starling-dev/starling/pkg/taskid"
)

func init() { subcommands = append(subcommands, newPreheatCmd) }

// pollInterval is how often the schedulers are asked how far the seeds are.
const pollInterval = 500 * time.Millisecond

// stallResend is how long a blob may show no progress before it is asked
// of the scheduler again: the seed may have died or lost the work (a
// scheduler restart forgets its queue), or the origin refused it once. A
// seed already working on the blob ignores the repeat. (A variable for tests.)
var stallResend = 30 * time.Second

// schedulerCallTimeout bounds one call to a scheduler, which answers from memory.
const schedulerCallTimeout = 10 * time.Second

// preheatBlob is one blob to put on a seed peer.
type preheatBlob struct {
	Work      *schedulerpb.Work
	Size      int64
	Kind      string   // "layer" or "config"
	Platforms []string // the platforms whose image holds it
}

// preheatPlan is what an image resolves to.
type preheatPlan struct {
	Reference string
	Digest    string // of the manifest or index the reference names
	Blobs     []*preheatBlob
}

// preheatBlobOutput is one blob in `preheat --output json`.
type preheatBlobOutput struct {
	TaskID    string   `json:"task_id"`
	Digest    string   `json:"digest"`
	URL       string   `json:"url"`
	Kind      string   `json:"kind"`
	Platforms []string `json:"platforms,omitempty"`
	Size      int64    `json:"size"`
	Scheduler string   `json:"scheduler"`
	Seed      string   `json:"seed"`
	Done      bool     `json:"done"`
}

// preheatOutput is what `preheat --output json` prints at the end.
type preheatOutput struct {
	Image   string              `json:"image"`
	Digest  string              `json:"digest"`
	Blobs   []preheatBlobOutput `json:"blobs"`
	Bytes   int64               `json:"bytes"`
	Waited  bool                `json:"waited"`
	Done    bool                `json:"done"`
	Seconds float64             `json:"seconds"`
}

type preheatOptions struct {
	platforms    []string
	schedulers   []string
	headers      []string
	timeout      time.Duration
	noWait       bool
	registryAuth bool
}

func newPreheatCmd() *cobra.Command {
	var o preheatOptions
	cmd := &cobra.Command{
		Use:   "preheat IMAGE",
		Short: "Have seed peers fetch every layer of an image before anyone needs it",
		Long: `Ask the schedulers to have seed peers fetch every blob of an image (its
layers and config; of every platform of an index, or only those given with
--platform) from the registry, then wait until a seed holds each of them,
showing the progress per blob. A blob's scheduler is picked by rendezvous
hashing over --scheduler (default: the configuration's peer.schedulers), as
peers do.

The seeds fetch from the registry itself, with the headers given by -H. When
no Authorization header is given, preheat obtains one from the registry with
the local credentials (~/.docker/config.json), as a pull would, and passes it
on: the seed needs it for private images and for Docker Hub's anonymous
tokens. --registry-auth=false turns that off.`,
		Example: `  starling preheat registry.example.com/app:1.4
  starling preheat --platform linux/arm64 --scheduler sched1:8002,sched2:8002 docker.io/library/python:3.12
  starling preheat --no-wait -H "Authorization: Bearer $TOKEN" registry.example.com/private/app:1.4
  starling preheat --output json app:1.4 > preheat.json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runPreheat(cmd, args[0], o)
		},
	}
	f := cmd.Flags()
	f.StringSliceVar(&o.platforms, "platform", nil, "platforms of an index to preheat, os/arch[/variant] (default: all)")
	f.StringSliceVar(&o.schedulers, "scheduler", nil, "schedulers HOST:PORT[,HOST:PORT] (default: the configuration's peer.schedulers)")
	f.StringArrayVarP(&o.headers, "header", "H", nil, `header the seeds send to the registry, "Key: Value" (repeatable)`)
	f.DurationVar(&o.timeout, "timeout", 30*time.Minute, "give up when the seeds have not fetched everything by then")
	f.BoolVar(&o.noWait, "no-wait", false, "return once the work is queued, without waiting for the seeds")
	f.BoolVar(&o.registryAuth, "registry-auth", true, "without -H Authorization, get a registry token with the local credentials and pass it to the seeds")
	return cmd
}

func runPreheat(cmd *cobra.Command, image string, o preheatOptions) (err error) {
	start := time.Now()
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	if o.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.timeout)
		defer cancel()
	}
	cfg, err := loadConfig(cmd)
	if err != nil {
		return err
	}
	scheds := o.schedulers
	if !cmd.Flags().Changed("scheduler") {
		scheds = cfg.Peer.Schedulers
	}
	if len(scheds) == 0 {
		return fmt.Errorf("preheat %s: no scheduler: give --scheduler HOST:PORT or set peer.schedulers in %s", image, g.configPath)
	}
	hdr, err := parseHeaders(o.headers)
	if err != nil {
		return err
	}
	var platforms []*v1.Platform
	for _, s := range o.platforms {
		p, err := v1.ParsePlatform(s)
		if err != nil {
			return fmt.Errorf("--platform %q: %w", s, err)
		}
		if p.OS == "" || p.Architecture == "" {
			return fmt.Errorf("--platform %q: want os/arch[/variant]", s)
		}
		platforms = append(platforms, p)
	}
	c, err := registryClient(cmd)
	if err != nil {
		return err
	}
	ref, err := c.ParseReference(image)
	if err != nil {
		return err
	}
	if o.registryAuth && hdr.Get("Authorization") == "" {
		a, err := registryAuthorization(ctx, ref.Context(), cfg.Resolver.Host[ref.Context().RegistryStr()].SkipVerify)
		if err != nil {
			return fmt.Errorf("preheat %s: %w", image, err)
		}
		if a != "" {
			hdr.Set("Authorization", a)
		}
	}
	plan, err := planPreheat(ctx, c, ref, platforms, hdr)
	if err != nil {
		return fmt.Errorf("preheat %s: %w", image, timedOut(ctx, o.timeout, err))
	}

	pc, err := dialSchedulers(scheds)
	if err != nil {
		return err
	}
	defer pc.close()

	out := preheatOutput{Image: plan.Reference, Digest: plan.Digest, Waited: !o.noWait}
	outs := make([]*preheatBlobOutput, len(plan.Blobs))
	for i, b := range plan.Blobs {
		outs[i] = &preheatBlobOutput{TaskID: b.Work.TaskId, Digest: b.Work.Digest, URL: b.Work.Url, Kind: b.Kind,
			Platforms: b.Platforms, Size: b.Size, Scheduler: scheduler.Pick(b.Work.TaskId, scheds)}
		out.Bytes += b.Size
	}
	emit := func() error {
		out.Seconds = time.Since(start).Seconds()
		out.Done = true
		for _, b := range outs {
			out.Blobs = append(out.Blobs, *b)
			out.Done = out.Done && b.Done
		}
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}

	if err := pc.enqueue(ctx, outs, plan.Blobs); err != nil {
		return fmt.Errorf("preheat %s: %w", plan.Reference, timedOut(ctx, o.timeout, err))
	}
	if o.noWait {
		if g.output == "json" {
			return emit()
		}
		fmt.Fprintf(cmd.OutOrStdout(), "queued %d blobs (%s) of %s on seed peers\n", len(outs), human(out.Bytes), plan.Reference)
		return nil
	}

	// JSON progress lines go to stderr, so that stdout holds the summary alone.
	prog := progress.New(cmd.ErrOrStderr(), progress.ModeFor(g.output, os.Stderr))
	bars := make([]*progress.Task, len(outs))
	for i, b := range outs {
		bars[i] = prog.Task(b.TaskID, fmt.Sprintf("%-6s %.19s", b.Kind, b.Digest), b.Size)
	}
	err = pc.wait(ctx, outs, plan.Blobs, bars)
	for _, b := range bars {
		b.Done(err)
	}
	prog.Wait()
	if err != nil {
		return fmt.Errorf("preheat %s: %w", plan.Reference, timedOut(ctx, o.timeout, err))
	}
	if g.output == "json" {
		return emit()
	}
	fmt.Fprintf(cmd.OutOrStdout(), "preheated %s (%s): %d blobs, %s, on seed peers in %.1fs\n",
		plan.Reference, plan.Digest, len(outs), human(out.Bytes), time.Since(start).Seconds())
	return nil
}

// planPreheat resolves ref to the blobs to preheat: the layers and config
// of each of its images (those of platforms, or all, for an index), once
// each.
func planPreheat(ctx context.Context, c *registry.Client, ref name.Reference, platforms []*v1.Platform, hdr http.Header) (*preheatPlan, error) {
	desc, err := c.Get(ctx, ref)
	if err != nil {
		return nil, err
	}
	plan := &preheatPlan{Reference: ref.Name(), Digest: desc.Digest.String()}
	seen := map[string]*preheatBlob{}
	add := func(d v1.Descriptor, kind, platform string) error {
		if b := seen[d.Digest.String()]; b != nil {
			if platform != "" && !contains(b.Platforms, platform) {
				b.Platforms = append(b.Platforms, platform)
			}
			return nil
		}
		u := registry.BlobURL(ref.Context(), d.Digest)
		id, err := taskid.ForURL(u, "", nil)
		if err != nil {
			return err
		}
		w := &schedulerpb.Work{TaskId: id, Url: u, Digest: d.Digest.String(), Header: map[string]*schedulerpb.HeaderValues{}}
		for k, vs := range hdr {
			w.Header[k] = &schedulerpb.HeaderValues{Values: append([]string(nil), vs...)}
		}
		b := &preheatBlob{Work: w, Size: d.Size, Kind: kind}
		if platform != "" {
			b.Platforms = []string{platform}
		}
		seen[d.Digest.String()] = b
		plan.Blobs = append(plan.Blobs, b)
		return nil
	}
	addImage := func(img v1.Image, platform string) error {
		m, err := img.Manifest()
		if err != nil {
			return fmt.Errorf("manifest of %s: %w", platformOr(platform, ref.Name()), err)
		}
		if err := add(m.Config, "config", platform); err != nil {
			return err
		}
		for _, l := range m.Layers {
			// Foreign layers live elsewhere and are not the registry's to serve.
			if !l.MediaType.IsDistributable() {
				continue
			}
			if err := add(l, "layer", platform); err != nil {
				return err
			}
		}
		return nil
	}

	if !desc.MediaType.IsIndex() {
		img, err := desc.Image()
		if err != nil {
			return nil, err
		}
		platform := ""
		if cf, err := img.ConfigFile(); err == nil && cf.OS != "" {
			p := cf.Platform()
			platform = p.String()
			if len(platforms) > 0 && !matchesAny(*p, platforms) {
				return nil, fmt.Errorf("the image is %s, not %s", platform, platformList(platforms))
			}
		}
		if err := addImage(img, platform); err != nil {
			return nil, err
		}
		return plan, nil
	}

	idx, err := desc.ImageIndex()
	if err != nil {
		return nil, err
	}
	var walk func(idx v1.ImageIndex, depth int) error
	walk = func(idx v1.ImageIndex, depth int) error {
		if depth > 4 {
			return errors.New("indexes nested too deep")
		}
		im, err := idx.IndexManifest()
		if err != nil {
			return err
		}
		for _, m := range im.Manifests {
			switch {
			case m.MediaType.IsIndex():
				child, err := idx.ImageIndex(m.Digest)
				if err != nil {
					return fmt.Errorf("index %s: %w", m.Digest, err)
				}
				if err := walk(child, depth+1); err != nil {
					return err
				}
			case m.MediaType.IsImage():
				// BuildKit's attestations are manifests too, of no platform.
				if m.Annotations["vnd.docker.reference.type"] == "attestation-manifest" {
					continue
				}
				platform := ""
				if m.Platform != nil {
					platform = m.Platform.String()
					if m.Platform.OS == "unknown" {
						continue
					}
				}
				if len(platforms) > 0 && (m.Platform == nil || !matchesAny(*m.Platform, platforms)) {
					continue
				}
				img, err := idx.Image(m.Digest)
				if err != nil {
					return fmt.Errorf("image %s (%s): %w", m.Digest, platformOr(platform, "no platform"), err)
				}
				if err := addImage(img, platform); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := walk(idx, 0); err != nil {
		return nil, err
	}
	if len(plan.Blobs) == 0 {
		if len(platforms) > 0 {
			return nil, fmt.Errorf("no image for %s in the index", platformList(platforms))
		}
		return nil, errors.New("the index holds no image")
	}
	return plan, nil
}

func matchesAny(p v1.Platform, specs []*v1.Platform) bool {
	for _, s := range specs {
		if p.Satisfies(*s) {
			return true
		}
	}
	return false
}

func platformList(ps []*v1.Platform) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String())
	}
	return strings.Join(s, ", ")
}

func platformOr(p, alt string) string {
	if p != "" {
		return p
	}
	return alt
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// registryAuthorization returns the Authorization header a pull of repo
// would send to its registry ("" when the registry wants none), obtained
// through go-containerregistry's token flow with the local credentials.
func registryAuthorization(ctx context.Context, repo name.Repository, skipVerify bool) (string, error) {
	auth, err := authn.DefaultKeychain.Resolve(repo.Registry)
	if err != nil {
		return "", fmt.Errorf("credentials for %s: %w", repo.RegistryStr(), err)
	}
	base := http.DefaultTransport.(*http.Transport).Clone()
	if skipVerify {
		base.TLSClientConfig = &tls.Config{InsecureSkipVerify: true} //nolint:gosec // the resolver configuration asks for it
	}
	capt := &authCapture{inner: base, host: repo.RegistryStr()}
	rt, err := transport.NewWithContext(ctx, repo.Registry, auth, capt, []string{repo.Scope(transport.PullScope)})
	if err != nil {
		return "", fmt.Errorf("authenticate to %s: %w", repo.RegistryStr(), err)
	}
	// Any request to the registry carries the header; the ping to /v2/
	// answers whatever the repository holds.
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, repo.Scheme()+"://"+repo.RegistryStr()+"/v2/", nil)
	if err != nil {
		return "", err
	}
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return "", fmt.Errorf("authenticate to %s: %w", repo.RegistryStr(), err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	capt.mu.Lock()
	defer capt.mu.Unlock()
	return capt.auth, nil
}

// authCapture remembers the Authorization header sent to one host.
type authCapture struct {
	inner http.RoundTripper
	host  string
	mu    sync.Mutex
	auth  string
}

func (a *authCapture) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Host == a.host {
		if v := r.Header.Get("Authorization"); v != "" {
			a.mu.Lock()
			a.auth = v
			a.mu.Unlock()
		}
	}
	return a.inner.RoundTrip(r)
}

// preheatClient talks to the schedulers.
type preheatClient struct {
	addrs   []string
	conns   []*grpc.ClientConn
	clients map[string]schedulerpb.SchedulerClient
}

func dialSchedulers(addrs []string) (*preheatClient, error) {
	pc := &preheatClient{addrs: addrs, clients: map[string]schedulerpb.SchedulerClient{}}
	for _, a := range addrs {
		// Dial does not connect yet; the first call says whether it answers.
		conn, err := grpc.Dial(a, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			pc.close()
			return nil, fmt.Errorf("scheduler %s: %w", a, err)
		}
		pc.conns = append(pc.conns, conn)
		pc.clients[a] = schedulerpb.NewSchedulerClient(conn)
	}
	return pc, nil
}

func (pc *preheatClient) close() {
	for _, c := range pc.conns {
		c.Close()
	}
}

// enqueue sends each blob's work to its scheduler. Every scheduler is
// asked even when one fails, so that what can start starts.
func (pc *preheatClient) enqueue(ctx context.Context, outs []*preheatBlobOutput, blobs []*preheatBlob) error {
	by := map[string][]int{}
	for i, o := range outs {
		by[o.Scheduler] = append(by[o.Scheduler], i)
	}
	var errs []error
	for _, addr := range sortedKeys(by) {
		if err := pc.enqueueAt(ctx, addr, by[addr], outs, blobs); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (pc *preheatClient) enqueueAt(ctx context.Context, addr string, idx []int, outs []*preheatBlobOutput, blobs []*preheatBlob) error {
	req := &schedulerpb.PreheatRequest{}
	for _, i := range idx {
		req.Tasks = append(req.Tasks, blobs[i].Work)
	}
	cctx, cancel := context.WithTimeout(ctx, schedulerCallTimeout)
	defer cancel()
	resp, err := pc.clients[addr].Preheat(cctx, req)
	if err != nil {
		return fmt.Errorf("ask scheduler %s to preheat %d blobs: %s", addr, len(idx), rpcMessage(err))
	}
	seeds := resp.GetSeeds()
	missing := 0
	for k, i := range idx {
		if k < len(seeds) && seeds[k] != "" {
			outs[i].Seed = seeds[k]
		} else {
			missing++
		}
	}
	if missing > 0 {
		return &noSeedError{addr: addr, missing: missing, total: len(idx)}
	}
	return nil
}

// wait polls the schedulers until a seed holds every blob, re-asking for
// blobs that stall.
func (pc *preheatClient) wait(ctx context.Context, outs []*preheatBlobOutput, blobs []*preheatBlob, bars []*progress.Task) error {
	by := map[string][]int{}
	for i, o := range outs {
		by[o.Scheduler] = append(by[o.Scheduler], i)
	}
	shown := make([]int64, len(outs))
	lastFetched := make([]int32, len(outs))
	lastChange := make([]time.Time, len(outs))
	now := time.Now()
	for i := range lastChange {
		lastChange[i] = now
	}
	down := map[string]bool{}
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		left := 0
		for _, addr := range sortedKeys(by) {
			var ids []string
			var pending []int
			for _, i := range by[addr] {
				if !outs[i].Done {
					ids = append(ids, outs[i].TaskID)
					pending = append(pending, i)
				}
			}
			if len(ids) == 0 {
				continue
			}
			left += len(ids)
			cctx, cancel := context.WithTimeout(ctx, schedulerCallTimeout)
			resp, err := pc.clients[addr].TaskStatus(cctx, &schedulerpb.TaskStatusRequest{TaskIds: ids})
			cancel()
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				// A restarting scheduler: keep asking, the seeds re-announce.
				if !down[addr] {
					slog.Warn("scheduler does not answer; still waiting", "scheduler", addr, "err", err)
					down[addr] = true
				}
				continue
			}
			down[addr] = false
			states := map[string]*schedulerpb.TaskState{}
			for _, s := range resp.GetTasks() {
				states[s.GetTaskId()] = s
			}
			var stalled []int
			for _, i := range pending {
				s := states[outs[i].TaskID]
				if s == nil {
					s = &schedulerpb.TaskState{}
				}
				if b := fetchedBytes(s, outs[i].Size); b > shown[i] {
					bars[i].Add(b - shown[i])
					shown[i] = b
				}
				if s.GetFetched() != lastFetched[i] {
					lastFetched[i] = s.GetFetched()
					lastChange[i] = time.Now()
				}
				if s.GetSeedsComplete() >= 1 {
					outs[i].Done = true
					left--
					bars[i].Done(nil)
					continue
				}
				if time.Since(lastChange[i]) >= stallResend {
					stalled = append(stalled, i)
					lastChange[i] = time.Now()
				}
			}
			if len(stalled) > 0 {
				slog.Info("blobs made no progress; asking the scheduler again", "scheduler", addr, "blobs", len(stalled))
				if err := pc.enqueueAt(ctx, addr, stalled, outs, blobs); err != nil {
					if ctx.Err() != nil {
						return ctx.Err()
					}
					// The seed died and no other is left: waiting is pointless.
					var nse *noSeedError
					if errors.As(err, &nse) {
						return err
					}
					slog.Warn("re-queue stalled blobs", "err", err)
				}
			}
		}
		if left == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// rpcMessage is the readable part of a gRPC error.
func rpcMessage(err error) string {
	if st, ok := status.FromError(err); ok {
		if st.Code() == codes.Unavailable {
			return "unreachable: " + st.Message()
		}
		return st.Code().String() + ": " + st.Message()
	}
	return err.Error()
}

// noSeedError is a scheduler's answer that it knows no live seed peer.
type noSeedError struct {
	addr           string
	missing, total int
}

func (e *noSeedError) Error() string {
	return fmt.Sprintf("no live seed peer at scheduler %s (%d of %d blobs not queued)", e.addr, e.missing, e.total)
}

// fetchedBytes estimates the bytes a task's fetched pieces hold. The
// status carries the piece size; a scheduler that does not say it gets the
// size the piece count implies.
func fetchedBytes(s *schedulerpb.TaskState, size int64) int64 {
	length := s.GetLength()
	if length <= 0 {
		length = size
	}
	n := int64(s.GetPieces())
	if n <= 0 || length <= 0 {
		return 0
	}
	if s.GetSeedsComplete() >= 1 || int64(s.GetFetched()) >= n {
		return length
	}
	ps := s.GetPieceSize()
	if ps <= 0 || int64(piece.Count(length, ps)) != n {
		// Piece sizes are powers of two: the one that gives n pieces.
		ps = 1
		for ps < (length+n-1)/n {
			ps *= 2
		}
		if int64(piece.Count(length, ps)) != n {
			ps = (length + n - 1) / n
		}
	}
	return min(int64(s.GetFetched())*ps, length)
}

// timedOut names the end of --timeout as such.
func timedOut(ctx context.Context, timeout time.Duration, err error) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("timed out after %s", timeout)
	}
	if ctx.Err() != nil {
		return errors.New("interrupted")
	}
	return err
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
