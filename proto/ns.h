/* Every namespace receiptd speaks, in one place, so that a grep for a namespace finds its handler. */
#ifndef RECEIPTD_PROTO_NS_H
#define RECEIPTD_PROTO_NS_H

#define NS_RECEIPTD "urn:receiptd:0"
#define NS_RECEIPTS "urn:xmpp:receipts"
#define NS_SID "urn:xmpp:sid:0"
#define NS_FORWARD "urn:xmpp:forward:0"
#define NS_DELAY "urn:xmpp:delay"
#define NS_PING "urn:xmpp:ping"
#define NS_DISCO_INFO "http://jabber.org/protocol/disco#info"
#define NS_STANZAS "urn:ietf:params:xml:ns:xmpp-stanzas"
#define NS_STREAMS "http://etherx.jabber.org/streams"
#define NS_STREAM_ERRORS "urn:ietf:params:xml:ns:xmpp-streams"
#define NS_COMPONENT "jabber:component:accept"
#define NS_CLIENT "jabber:client"

#endif
