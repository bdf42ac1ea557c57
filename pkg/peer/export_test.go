package peer

// HeldTask reports whether p holds task id open, which keeps storage GC
// from collecting it.
func HeldTask(p *Peer, id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tasks[id] != nil
}
