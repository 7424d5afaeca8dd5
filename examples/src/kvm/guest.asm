; The guest program of `pagewire kvm-demo` (64-bit long mode, ring 3, no kernel).
;
; Assemble with `nasm -f bin -o guest.bin guest.asm`; the bytes are in guest.rs (GUEST_CODE),
; and a unit test there re-assembles this file when nasm is installed and compares.
;
; Registers set by the VMM at boot (and migrated with the vCPU):
;   r8  counter: iterations done (one iteration rewrites one working-set page)
;   r9  checksum: wrapping sum of every u64 of the working set
;   r10 working-set base address, r11 working-set pages N
;   r12 status page: [0] counter, [1] checksum (stored after each iteration)
;   r13 next page index (always counter mod N)
;
; Iteration c rewrites page c mod N with 512 words: v = (c + 1) * K; then per word
; v = v * A + C (Knuth's MMIX LCG), word = v >> 40 (24 random bits a word: pages that
; DEFLATE compresses to about half, like much real guest memory). Each pass over the
; working set ends with one store of the counter to 0xC0000000, where the page tables map
; a page but no memory slot has memory: an MMIO exit to the VMM, the guest's only exit,
; where memory is consistent with the counter. (Not `out`: port I/O from ring 3 faulted on
; the hosts measured here even with IOPL 3.)
bits 64
org 0x10000

top:
    mov rdi, r13
    shl rdi, 12
    add rdi, r10                    ; rdi = page address
    lea rax, [r8 + 1]
    mov rbx, 0x9E3779B97F4A7C15
    imul rax, rbx                   ; v = (c + 1) * K
    mov rbx, 6364136223846793005    ; A
    mov rdx, 1442695040888963407    ; C
    xor esi, esi                    ; sum of the new words
    xor r14d, r14d                  ; sum of the old words
    mov ecx, 512
.word:
    add r14, [rdi]
    imul rax, rbx
    add rax, rdx
    mov r15, rax
    shr r15, 40
    mov [rdi], r15
    add rsi, r15
    add rdi, 8
    dec ecx
    jnz .word
    sub r9, r14
    add r9, rsi                     ; checksum += new - old
    inc r8
    mov [r12], r8
    mov [r12 + 8], r9
    inc r13
    cmp r13, r11
    jb top
    xor r13d, r13d
    mov edi, 0xC0000000
    mov [rdi], r8                   ; checkpoint: one MMIO exit per pass
    jmp top
