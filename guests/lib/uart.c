/*
 * Polled output on the COM1 16550A (PC16550D datasheet: registers THR 0, FCR 2, LSR 5).
 * With the FIFOs on, LSR.THRE set means the whole 16-byte transmit FIFO is empty, so after one
 * LSR read up to 16 bytes may be written: about one port exit per byte instead of two.
 */
#include "guest.h"

#define UART_THR 0
#define UART_FCR 2      /* write: FIFO control */
#define UART_IIR 2      /* read: bits 7:6 = 11 when the FIFOs are enabled */
#define UART_LSR 5
#define LSR_THRE 0x20
#define FIFO_SIZE 16

static unsigned burst = 1;      /* bytes one THRE allows: 16 with a working FIFO, else 1 */
static unsigned room;

void uart_init(void)
{
	outb(PORT_COM1 + UART_FCR, 0x07);       /* enable FIFOs, clear both */
	burst = (inb(PORT_COM1 + UART_IIR) & 0xC0) == 0xC0 ? FIFO_SIZE : 1;
	room = 0;
}

void uart_putc(char c)
{
	if (room == 0) {
		/* bounded: a UART that never reports THRE must not hang the guest */
		for (unsigned i = 0; i < 100000 && !(inb(PORT_COM1 + UART_LSR) & LSR_THRE); i++)
			cpu_relax();
		room = burst;
	}
	outb(PORT_COM1 + UART_THR, (u8)c);
	room--;
}
