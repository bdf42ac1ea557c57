package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/spf13/cobra"

	"github.com/starling-dev/starling/pkg/preheat"
	"github.com/starling-dev/starling/pkg/progress"
)

func init() { subcommands = append(subcommands, newPreheatCmd) }

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
	platforms  []string
	schedulers []string
	headers    []string
	timeout    time.Duration
	noWait     bool
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

The seeds fetch from the registry themselves, with their own node's
credentials: no registry credential leaves this machine (only an Accept
header given with -H is passed on). The local credentials
(~/.docker/config.json) are used to read the image's manifests here.`,
		Example: `  starling preheat registry.example.com/app:1.4
  starling preheat --platform linux/arm64 --scheduler sched1:8002,sched2:8002 docker.io/library/python:3.12
  starling preheat --no-wait registry.example.com/private/app:1.4
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
	clientTLS, err := clusterClientTLS(cmd)
	if err != nil {
		return fmt.Errorf("preheat %s: %w", image, err)
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
	if hdr.Get("Authorization") != "" {
		slog.Warn("preheat: the Authorization header is not passed to the seeds: they fetch with their own node's credentials")
	}
	plan, err := preheat.NewPlan(ctx, c, ref, platforms, hdr)
	if err != nil {
		return fmt.Errorf("preheat %s: %w", image, timedOut(ctx, o.timeout, err))
	}
	job, err := preheat.NewJob(plan, preheat.Options{Schedulers: scheds, Logger: slog.Default(), TLS: clientTLS})
	if err != nil {
		return fmt.Errorf("preheat %s: %w", image, err)
	}
	defer job.Close()

	out := preheatOutput{Image: plan.Reference, Digest: plan.Digest, Waited: !o.noWait}
	for _, b := range plan.Blobs {
		out.Bytes += b.Size
	}
	emit := func() error {
		out.Seconds = time.Since(start).Seconds()
		out.Done = true
		for i, st := range job.Status() {
			b := plan.Blobs[i]
			out.Blobs = append(out.Blobs, preheatBlobOutput{TaskID: b.Work.TaskId, Digest: b.Work.Digest, URL: b.Work.Url,
				Kind: b.Kind, Platforms: b.Platforms, Size: b.Size, Scheduler: st.Scheduler, Seed: st.Seed, Done: st.Done})
			out.Done = out.Done && st.Done
		}
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}

	if err := job.Enqueue(ctx); err != nil {
		return fmt.Errorf("preheat %s: %w", plan.Reference, timedOut(ctx, o.timeout, err))
	}
	if o.noWait {
		if g.output == "json" {
			return emit()
		}
		fmt.Fprintf(cmd.OutOrStdout(), "queued %d blobs (%s) of %s on seed peers\n", len(plan.Blobs), human(out.Bytes), plan.Reference)
		return nil
	}

	// JSON progress lines go to stderr, so that stdout holds the summary alone.
	prog := progress.New(cmd.ErrOrStderr(), progress.ModeFor(g.output, os.Stderr))
	bars := make([]*progress.Task, len(plan.Blobs))
	shown := make([]int64, len(plan.Blobs))
	for i, b := range plan.Blobs {
		bars[i] = prog.Task(b.Work.TaskId, fmt.Sprintf("%-6s %.19s", b.Kind, b.Work.Digest), b.Size)
	}
	err = job.Wait(ctx, func(i int, st preheat.Status) {
		bars[i].Add(st.Fetched - shown[i])
		shown[i] = st.Fetched
		if st.Done {
			bars[i].Done(nil)
		}
	})
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
		plan.Reference, plan.Digest, len(plan.Blobs), human(out.Bytes), time.Since(start).Seconds())
	return nil
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
